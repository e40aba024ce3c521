"""Bayesian differential expression and accessibility between groups of cells.

The procedure is scvi-tools' (Lopez et al. 2018; Boyeau et al. 2019), with its column
names, so downstream code keeps working: pairs of cells are drawn from the two groups,
a latent sample ``z ~ q(z | x)`` of each is decoded to normalized proportions ``rho``
(library size removed), and the per-feature log2 fold change ``lfc = log2(rho1 + eps) -
log2(rho2 + eps)`` over the pairs gives ``proba_de = P(|lfc| > delta)`` (``mode="change"``)
or ``P(rho1 > rho2)`` (``mode="vanilla"``). Everything is vectorized over features and
pairs: the pairs are decoded in chunks into float32 ``(n_samples, n_features)`` arrays
(checked against the memory available first), summarized in blocks of features.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

from ..batch import CellBatch
from .._host_memory import reuse_large_host_buffers
from ..config import InferenceConfig
from ._outputs import check_fits_in_memory

__all__ = ["DifferentialMethods"]

#: features per block of the fold-change summaries (a block of both groups' samples stays in cache)
_SUMMARY_BLOCK = 128


def _fold_change_summaries(rho1: torch.Tensor, rho2: torch.Tensor, pseudocount: float, delta: float, mode: str) -> dict:
    """Per-feature summaries of the sampled proportions ``rho1``/``rho2`` (``(n_samples,
    n_features)``): ``proba_de`` and its Monte-Carlo error, Bayes factor, mean scales and
    the moments of ``lfc = log2(rho1 + pseudocount) - log2(rho2 + pseudocount)``.

    Features are processed in blocks of :data:`_SUMMARY_BLOCK` columns, so each block's
    fold changes are made and summarized while in cache (one pass over memory instead of
    one per statistic); the medians (the lower middle value, as ``torch.median``'s) are
    selected by numpy from each block's transposed copy. With several torch threads the
    blocks go to as many worker threads, each block's operations in one thread (torch and
    numpy release the GIL): the selection has no parallel form, so this keeps every core busy.
    """
    n_samples, n_features = rho1.shape
    middle = (n_samples - 1) // 2
    blocked = ("proba_de", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max")
    out = {name: np.empty(n_features, dtype=np.float64 if name == "proba_de" else np.float32) for name in blocked}
    torch_threads = torch.get_num_threads()

    def summarize(lo: int) -> None:
        hi = min(lo + _SUMMARY_BLOCK, n_features)
        r1, r2 = rho1[:, lo:hi], rho2[:, lo:hi]
        lfc = torch.log2(r1 + pseudocount).sub_(torch.add(r2, pseudocount).log2_())  # (n_samples, block), contiguous
        hits = lfc.abs().gt_(delta) if mode == "change" else torch.gt(r1, r2)
        out["proba_de"][lo:hi] = hits.sum(0, dtype=torch.float64).numpy() / n_samples
        # mean, then the variance about it (two passes over the cached block; var_mean is ~10x slower)
        mean = lfc.sum(0).div_(n_samples)
        variance = (lfc - mean).square_().sum(0).div_(n_samples)
        out["lfc_mean"][lo:hi], out["lfc_std"][lo:hi] = mean.numpy(), variance.sqrt_().numpy()
        out["lfc_min"][lo:hi], out["lfc_max"][lo:hi] = lfc.amin(0).numpy(), lfc.amax(0).numpy()  # 10x aminmax here
        rows = lfc.t().contiguous().numpy()  # numpy's selection along rows: ~10x faster than torch's sort
        rows.partition(middle, axis=1)
        out["lfc_median"][lo:hi] = rows[:, middle]

    starts = range(0, n_features, _SUMMARY_BLOCK)
    n_threads = min(torch_threads, len(starts))
    if n_threads == 1:
        for lo in starts:
            summarize(lo)
    else:  # blocks in parallel threads, each block's operations in one (torch and numpy release the GIL)
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(summarize, starts))
        finally:
            torch.set_num_threads(torch_threads)
    out["scale1"], out["scale2"] = rho1.mean(0).numpy(), rho2.mean(0).numpy()  # whole columns: faster than per block
    proba = out["proba_de"]
    eps = 1e-8
    return {
        "proba_de": proba,
        "proba_not_de": 1.0 - proba,
        "bayes_factor": np.log(proba + eps) - np.log(1.0 - proba + eps),
        "proba_de_se": np.sqrt(proba * (1.0 - proba) / n_samples),  # Monte-Carlo standard error
        **{name: out[name] for name in ("scale1", "scale2", *blocked[1:])},
    }


def _posterior_fdr(proba_de: np.ndarray, target: float) -> np.ndarray:
    """scvi-tools' posterior expected FDR control: the features with the highest
    ``proba_de`` whose running mean of ``1 - proba_de`` stays at or below ``target``."""
    order = np.argsort(-proba_de, kind="stable")
    fdr = np.cumsum(1.0 - proba_de[order]) / np.arange(1, len(order) + 1)  # non-decreasing
    below = np.flatnonzero(fdr <= target)
    out = np.zeros(len(proba_de), dtype=bool)
    out[order[: int(below.max()) + 1 if len(below) else 0]] = True
    return out


class DifferentialMethods:
    """:meth:`differential_expression` and :meth:`differential_accessibility` of :class:`~sclatent.SCLatent`."""

    def _group_masks(self, obs: pd.DataFrame, obs_names: pd.Index, groupby, group1, group2, idx1, idx2) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        """``[(name1, name2, mask1, mask2)]``: the comparisons asked for."""
        n = len(obs_names)

        def mask_of(idx, name):
            idx = np.asarray(idx)
            if idx.dtype == bool:
                if len(idx) != n:
                    raise ValueError(f"{name} is a boolean mask of length {len(idx)}; the data has {n} cells.")
                return idx
            if idx.dtype.kind in "iu":
                m = np.zeros(n, dtype=bool)
                m[idx] = True
                return m
            pos = obs_names.get_indexer(pd.Index(idx.astype(str)))
            if (pos < 0).any():
                raise ValueError(f"{name} names {int((pos < 0).sum())} cell(s) that are not in obs_names.")
            m = np.zeros(n, dtype=bool)
            m[pos] = True
            return m

        if idx1 is not None:
            m1 = mask_of(idx1, "idx1")
            m2 = ~m1 if idx2 is None else mask_of(idx2, "idx2")
            return [("idx1", "rest" if idx2 is None else "idx2", m1, m2)]
        if groupby is None:
            raise ValueError("Give groupby= (an obs column) with group1= (and optionally group2=), or idx1= (and idx2=).")
        if groupby not in obs.columns:
            raise ValueError(f"groupby={groupby!r} is not an obs column; available: {list(obs.columns)}.")
        labels = obs[groupby]
        if labels.isna().any():
            raise ValueError(f"obs[{groupby!r}] has {int(labels.isna().sum())} missing value(s); fill or drop them first.")
        labels = labels.astype(str).reindex(obs_names).to_numpy() if not labels.index.equals(obs_names) else labels.astype(str).to_numpy()
        present = list(pd.unique(labels))
        groups = present if group1 is None else ([group1] if isinstance(group1, str) else list(group1))
        for g in groups + ([group2] if group2 is not None else []):
            if str(g) not in present:
                raise ValueError(f"obs[{groupby!r}] has no group {g!r}; groups: {sorted(present)}.")
        out = []
        for g in groups:
            m1 = labels == str(g)
            m2 = ~m1 if group2 is None else labels == str(group2)
            out.append((str(g), "rest" if group2 is None else str(group2), m1, m2))
        return out

    def _differential(
        self, adata, modality: str, groupby, group1, group2, idx1, idx2, mode: str, delta: float,
        fdr_target: float, batch_correction: bool, n_samples: int, pseudocount: float, features, options: dict, method: str,
    ) -> pd.DataFrame:
        if mode not in ("change", "vanilla"):
            raise ValueError(f"mode must be 'change' or 'vanilla', got {mode!r}.")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta}.")
        if not 0 < fdr_target < 1:
            raise ValueError(f"fdr_target must lie in (0, 1), got {fdr_target}.")
        if int(n_samples) < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}.")
        opts = InferenceConfig.of(options, method, batch_size=2048)
        data = self.data if adata is None else adata
        tensors, obs_names = self._tensors_for(adata)
        j = self._modality_names().index(modality)
        names = list(self.registry.modality(modality).var_names)
        cols = None
        if features is not None:
            cols = pd.Index(names).get_indexer(list(features))
            if (cols < 0).any():
                raise ValueError(f"{int((cols < 0).sum())} requested feature(s) are not in modality {modality!r}.")
            names = [names[c] for c in cols]
        check_fits_in_memory(4 * 2 * int(n_samples) * len(names), f"{n_samples} samples x {len(names)} features", method)
        observed = tensors.observed_host[:, j].numpy()
        batch_codes = None
        if batch_correction:
            if not self.registry.batch_key:
                raise ValueError("batch_correction=True needs a model set up with batch_key.")
            batch_codes = range(len(self.registry.categories[self.registry.batch_key]))
        # the (n_samples, n_features) arrays made and freed per comparison are reused, not page-faulted in afresh
        with reuse_large_host_buffers():
            return self._compare(tensors, data, obs_names, j, modality, names, cols, observed, batch_codes, groupby, group1, group2,
                                 idx1, idx2, mode, delta, fdr_target, n_samples, pseudocount, opts)

    def _compare(self, tensors, data, obs_names, j, modality, names, cols, observed, batch_codes, groupby, group1, group2,
                 idx1, idx2, mode, delta, fdr_target, n_samples, pseudocount, opts) -> pd.DataFrame:
        rng = np.random.default_rng(opts.seed)
        gen = self._generator(opts.seed)
        comparisons = []
        for name1, name2, m1, m2 in self._group_masks(data.obs, obs_names, groupby, group1, group2, idx1, idx2):
            cells1, cells2 = np.flatnonzero(m1), np.flatnonzero(m2)
            if not len(cells1) or not len(cells2):
                raise ValueError(f"comparison {name1} vs {name2}: a group has no cells ({len(cells1)} and {len(cells2)}).")
            picks = (rng.choice(cells1, size=int(n_samples), replace=True), rng.choice(cells2, size=int(n_samples), replace=True))
            comparisons.append((name1, name2, cells1, cells2, picks))
        # every drawn cell's posterior once (cells are drawn many times, and in several comparisons)
        drawn = np.unique(np.concatenate([p for c in comparisons for p in c[4]]))
        table = self._posterior_table(tensors, drawn, opts, gen)
        frames, every = [], None  # every: the sums over all cells, for comparisons against the rest
        for name1, name2, cells1, cells2, (pick1, pick2) in comparisons:
            rho1 = self._sample_proportions(tensors, table, drawn, pick1, j, modality, batch_codes, cols, opts, gen)
            rho2 = self._sample_proportions(tensors, table, drawn, pick2, j, modality, batch_codes, cols, opts, gen)
            frame = pd.DataFrame(_fold_change_summaries(rho1, rho2, pseudocount, delta, mode), index=pd.Index(names, name=None))
            del rho1, rho2
            sums1 = self._group_sums(tensors, modality, cells1, observed, cols)
            if len(cells1) + len(cells2) == len(observed) and not np.isin(cells2, cells1).any():  # the rest: all cells less group 1
                if every is None:
                    every = self._group_sums(tensors, modality, np.arange(len(observed)), observed, cols)
                sums2 = (every[0] - sums1[0], every[1] - sums1[1])
            else:
                sums2 = self._group_sums(tensors, modality, cells2, observed, cols)
            frame = frame.join(self._group_stats(sums1, sums2, names))
            frame[f"is_de_fdr_{fdr_target}"] = _posterior_fdr(frame["proba_de"].to_numpy(), fdr_target)
            frame["comparison"] = f"{name1} vs {name2}"
            frame["group1"], frame["group2"] = name1, name2
            frame["delta"] = delta if mode == "change" else np.nan
            frames.append(frame.sort_values("proba_de", ascending=False, kind="stable") if mode == "change" else frame.sort_values("bayes_factor", ascending=False, kind="stable"))
        return pd.concat(frames)

    def _posterior_table(self, tensors, cells: np.ndarray, opts, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and log-variances of ``cells`` (ascending), in that order (of the base
        Gaussian for a flow posterior: ``module.posterior`` rebuilds the posterior from them)."""
        module = self.module
        module.eval()
        means, logvars = [], []
        for part in np.array_split(cells, max(1, -(-len(cells) // opts.batch_size))):
            batch = tensors.batch(torch.as_tensor(part), module.dense_count_modalities).to(self.device)
            with torch.no_grad():
                q, _ = self._posterior(batch, None, opts, gen)
            means.append(q.mean)
            logvars.append(q.logvar)
        return torch.cat(means), torch.cat(logvars)

    def _sample_proportions(self, tensors, table, table_cells, cells, j: int, modality: str, batch_codes, cols, opts, gen) -> torch.Tensor:
        """One posterior sample per entry of ``cells`` (from ``table``, the posteriors of
        ``table_cells``), decoded to proportions at library size 1; with ``batch_codes``,
        averaged over those batches. ``(len(cells), n_features)`` float32."""
        module = self.module
        n_modalities = len(module.modalities)
        rows = torch.as_tensor(np.searchsorted(table_cells, cells))
        n_out = len(cols) if cols is not None else module.modalities[j].n_features
        out = torch.empty(len(cells), n_out, dtype=torch.float32)
        start = 0
        for chunk in rows.split(opts.batch_size):
            on_device = chunk.to(self.device)
            with torch.no_grad():
                z = module.posterior(table[0][on_device], table[1][on_device]).sample(generator=gen)
                covariates = tensors.covariates.index(torch.as_tensor(table_cells)[chunk].to(tensors.device)).to(self.device)
                library = torch.zeros(len(chunk), n_modalities, device=self.device)  # proportions: library size 1
                # the first decoding's proportions go straight into the result's rows when they can
                # (float32 on the host, all features): no copy of a (chunk, n_features) array
                into = out[start : start + len(chunk)] if cols is None and z.dtype == torch.float32 and self.device.type == "cpu" else None
                total = None
                for code in [None] if batch_codes is None else list(batch_codes):
                    cov = covariates if code is None else covariates.replace(self.registry.batch_key, code)
                    decode = CellBatch({}, torch.ones_like(library), library, cov)
                    likelihood = module.generative(z, decode, modalities=(modality,))[modality]
                    if total is None:
                        total = likelihood.release_mean(out=into)
                    else:
                        total.add_(likelihood.release_mean())
                rho = total if batch_codes is None else total.div_(len(batch_codes))
                if cols is not None:
                    rho = rho[:, torch.as_tensor(cols, device=rho.device)]
            if into is None:
                out[start : start + len(chunk)] = rho.to(torch.float32).cpu()
            start += len(chunk)
        return out

    def _group_sums(self, tensors, modality: str, cells: np.ndarray, observed, cols) -> tuple[np.ndarray, int]:
        """``(3, n_features)`` sums of raw counts, normalized counts (per 10,000) and nonzero
        indicators over ``cells`` that have the modality, and how many such cells there are;
        from the stored nonzero entries by scatter-adds (no sparse matrix is built)."""
        matrix = tensors.counts[modality]
        cells = cells[observed[cells]]
        n_features = matrix.shape[1]
        sums = torch.zeros(3, n_features, dtype=torch.float64)
        for part in np.array_split(cells, -(-len(cells) // 4096)) if len(cells) else []:
            _, (r, c, v) = matrix.rows(torch.as_tensor(part), dense=False)
            r, c, v = r.cpu(), c.cpu(), v.cpu().to(torch.float64)
            library = torch.zeros(len(part), dtype=torch.float64).index_add_(0, r, v)  # over all features
            sums[0].index_add_(0, c, v)
            sums[1].index_add_(0, c, v * (1e4 / library.clamp(min=1.0)).index_select(0, r))
            sums[2].index_add_(0, c, (v > 0).to(torch.float64))
        out = sums.numpy()
        return (out if cols is None else out[:, np.asarray(cols)]), len(cells)

    @staticmethod
    def _group_stats(group1: tuple[np.ndarray, int], group2: tuple[np.ndarray, int], names) -> pd.DataFrame:
        """Raw means, normalized means (counts per 10,000) and fractions of nonzero counts per
        group, from :meth:`_group_sums` (NaN for a group with no cell of the modality)."""
        stats = {}
        for k, (sums, n) in (("1", group1), ("2", group2)):
            n = n if n else np.nan
            stats[f"raw_mean{k}"] = sums[0] / n
            stats[f"non_zeros_proportion{k}"] = sums[2] / n
            stats[f"raw_normalized_mean{k}"] = sums[1] / n
        return pd.DataFrame(stats, index=names)

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: str = "change",
        delta: float = 0.25,
        fdr_target: float = 0.05,
        batch_correction: bool = False,
        n_samples: int = 5000,
        pseudocount: float = 1e-6,
        modality: str | None = None,
        gene_list: Sequence[str] | None = None,
        **options,
    ) -> pd.DataFrame:
        """Bayesian differential expression between two groups of cells (scvi-tools' columns).

        Parameters
        ----------
        adata
            AnnData/MuData with the model's features (``None``: the training data).
        groupby, group1, group2
            An ``obs`` column and the group(s) to compare: each of ``group1`` (a name, a
            list, or ``None`` for every group) against ``group2`` (``None``: all other
            cells, reported as ``"rest"``).
        idx1, idx2
            Instead of groups: the two sets of cells (boolean masks, positions or
            ``obs_names``); ``idx2=None`` is every other cell.
        mode
            ``"change"``: ``proba_de = P(|lfc| > delta)``; ``"vanilla"``:
            ``proba_de = P(rho1 > rho2)``.
        delta
            Smallest log2 fold change that counts as a change (``mode="change"``).
        fdr_target
            Posterior expected FDR for the ``is_de_fdr_<fdr_target>`` column.
        batch_correction
            Average each sample's proportions over every batch of the model (decoding
            under each batch), so the comparison is not driven by batch composition.
        n_samples
            Pairs of cells drawn (with replacement) per comparison, one posterior sample
            each; ``proba_de_se`` is the Monte-Carlo standard error it gives.
        pseudocount
            Added to the proportions before the log.
        modality
            The modality (``None``: the first of an expression kind).
        gene_list
            Only these features (decoded anyway, kept in the result).
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`): ``batch_size``,
            ``seed``, ``refine_steps``.

        Returns
        -------
        pandas.DataFrame
            One row per feature and comparison, sorted by ``proba_de`` (``mode="change"``)
            or ``bayes_factor``: ``proba_de``, ``proba_not_de``, ``bayes_factor``,
            ``proba_de_se``, ``scale1``, ``scale2``, ``lfc_mean``, ``lfc_median``,
            ``lfc_std``, ``lfc_min``, ``lfc_max``, ``raw_mean1/2``,
            ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2``,
            ``is_de_fdr_<fdr_target>``, ``comparison``, ``group1``, ``group2``, ``delta``.
        """
        modality = self._modality_serving(modality, "expression", "differential_expression")
        return self._differential(adata, modality, groupby, group1, group2, idx1, idx2, mode, delta,
                                  fdr_target, batch_correction, n_samples, pseudocount, gene_list, options, "differential_expression")

    def differential_accessibility(
        self,
        adata=None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: str = "change",
        delta: float = 0.25,
        fdr_target: float = 0.05,
        batch_correction: bool = False,
        n_samples: int = 5000,
        pseudocount: float = 1e-6,
        modality: str | None = None,
        region_list: Sequence[str] | None = None,
        **options,
    ) -> pd.DataFrame:
        """Differential accessibility: :meth:`differential_expression` for a modality of an
        accessibility kind (``"atac"``), on its decoded proportions; same arguments (with
        ``region_list``) and columns. Cells without the modality (RNA-only cells) take part
        through their imputed accessibility."""
        modality = self._modality_serving(modality, "accessibility", "differential_accessibility")
        return self._differential(adata, modality, groupby, group1, group2, idx1, idx2, mode, delta,
                                  fdr_target, batch_correction, n_samples, pseudocount, region_list, options, "differential_accessibility")
