"""Grain pipelines per stage: case ids -> cached stage volumes -> raw samples -> batches.

Training: items (a case, or a (case, vertebra) pair for "seg") are shuffled per epoch, repeated,
turned into raw samples (``samples.host_sample``) with a numpy generator keyed by
(seed, epoch, position in the epoch), and batched, all as Grain ``MapDataset`` steps, so that the
batches depend only on the seed, never on the number of worker processes. The returned
``grain.IterDataset``'s iterator has ``get_state()`` / ``set_state()`` (a JSON-serialisable dict)
for checkpoints. Batches are raw batches: pass them through ``samples.make_device_transform``.

Evaluation: each item once, identity parameters, the last batch padded with copies of the last
item whose ``example_mask`` is False.
"""

import dataclasses

import grain
import numpy as np
from absl import flags

from verse_jax import io
from verse_jax.data import samples
from verse_jax.data.cache import load_stage_case, prepare_stage_cases
from verse_jax.labels import L6_INDEX
from verse_jax.stages import StageSpec


@dataclasses.dataclass(frozen=True)
class _Prepared:
    paths: tuple[str, ...]
    items: tuple[tuple[int, int], ...]  # (case index, landmark index or -1)
    volume_sizes: tuple[tuple[int, int, int], ...]
    valid: tuple[np.ndarray, ...]  # (K,) bool per case


def landmark_balance_repeats(valid: np.ndarray, max_repeats: int = 3) -> np.ndarray:
    """How often each case enters a training epoch so that rare landmarks are seen more often.

    A landmark held by ``n_k`` of the cases is ``r_k = median(n) / n_k`` times rarer than the
    typical one (median over the landmarks that any case holds); a case is repeated
    ``round(max r_k)`` times over its landmarks, clipped to ``[1, max_repeats]``. Cases without
    rare landmarks stay once; the draw stays seeded (the repeats are part of the epoch).

    Args:
        valid: (num_cases, K) bool, the landmarks each case holds.
        max_repeats: upper bound of a case's repeats.

    Returns:
        (num_cases,) int repeats >= 1.
    """
    valid = np.asarray(valid, bool)
    if valid.ndim != 2:
        raise ValueError(f"valid must be (num_cases, K), got shape {valid.shape}")
    if int(max_repeats) < 1:
        raise ValueError(f"max_repeats must be >= 1, got {max_repeats}")
    counts = valid.sum(axis=0).astype(np.float64)
    held = counts > 0
    if not held.any():
        return np.ones(len(valid), int)
    rarity = np.where(held, np.median(counts[held]) / np.maximum(counts, 1.0), 0.0)
    need = np.where(valid, rarity[None, :], 0.0).max(axis=1)
    return np.clip(np.round(need), 1, int(max_repeats)).astype(int)


def landmark_loss_weights(valid: np.ndarray, max_weight: float) -> np.ndarray:
    """Per-landmark factors of the SCN heatmap loss from the landmarks the training cases hold.

    A standard landmark (C1-L5) held by ``n_k`` cases gets ``clip(max_j n_j / n_k, 1,
    max_weight)``: the commonest landmark keeps 1 and a rare one up to ``max_weight``. The
    transitional landmarks (L6, and T13 with 26 landmarks) and landmarks no case holds keep 1:
    raising them makes their channels answer between T12 and L1 in scans without them (the demo
    SCN with T13 weighted by 4 predicted a T13 in 14 of 20 fresh phantoms, 3 of which have one).

    Args:
        valid: (num_cases, K) bool, the landmarks each training case holds (K = 25 or 26).
        max_weight: upper bound of a factor (>= 1).

    Returns:
        (K,) float64 factors >= 1.
    """
    valid = np.asarray(valid, bool)
    if valid.ndim != 2 or valid.shape[1] not in (25, 26):
        raise ValueError(f"valid must be (num_cases, 25 or 26), got shape {valid.shape}")
    if not max_weight >= 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    counts = valid.sum(axis=0).astype(np.float64)
    weights = np.ones(valid.shape[1])
    standard = np.arange(valid.shape[1]) < L6_INDEX
    held = standard & (counts > 0)
    if held.any():
        weights[held] = np.clip(counts[held].max() / counts[held], 1.0, float(max_weight))
    return weights


def training_landmarks(root, case_ids, spec: StageSpec, cache_dir) -> np.ndarray:
    """(num_cases, K) bool: the landmarks each training case holds (caches the cases first)."""
    return np.stack(_prepare(root, list(case_ids), spec, cache_dir).valid)


def _prepare(root, case_ids, spec: StageSpec, cache_dir) -> _Prepared:
    by_id = {case.case_id: case for case in io.find_cases(root)}
    missing = [i for i in case_ids if i not in by_id]
    if missing:
        raise ValueError(f"{root}: unknown case ids {missing}")
    paths = prepare_stage_cases([by_id[i] for i in case_ids], spec, cache_dir)
    items, sizes, valid = [], [], []
    for index, path in enumerate(paths):
        case = load_stage_case(path)
        sizes.append(tuple(case.image.shape))
        valid.append(np.asarray(case.valid, bool))
        if spec.name == "seg":
            items += [(index, int(k)) for k in np.flatnonzero(case.valid)]
        elif case.valid.any():
            items.append((index, -1))
    if not items:
        raise ValueError(f"{root}: no case among {list(case_ids)} has landmarks for {spec.name}")
    return _Prepared(tuple(str(p) for p in paths), tuple(items), tuple(sizes), tuple(valid))


class _MakeSample:
    """Picklable ``(index, item) -> raw sample``; opens cached cases lazily in each process."""

    def __init__(self, paths, spec, size, *, seed, epoch_length, train):
        self.paths, self.spec, self.size = paths, spec, size
        self.seed, self.epoch_length, self.train = seed, epoch_length, train
        self._cases = {}

    def __call__(self, index: int, item) -> dict:
        case_index, vertebra, real = item
        if case_index not in self._cases:
            self._cases[case_index] = load_stage_case(self.paths[case_index])
        rng = None
        if self.train:
            epoch, position = divmod(index, self.epoch_length)
            rng = np.random.default_rng([self.seed, epoch, position])
        sample = samples.host_sample(
            self._cases[case_index],
            self.spec,
            self.size,
            rng,
            vertebra=vertebra,
            case_index=case_index,
        )
        sample["example_mask"] = np.bool_(real)
        return sample


def _finish(dataset: grain.MapDataset, batch_size: int, num_workers: int) -> grain.IterDataset:
    # Few threads and a short buffer: a context box can be tens of MB (grain's default is 500).
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    dataset = dataset.batch(batch_size, drop_remainder=True).to_iter_dataset(read_options)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads one of its absl flags when it starts worker processes, which
            # raises outside an absl app; mark the (default) flags parsed, as absl.app would.
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        dataset = dataset.mp_prefetch(options)
    return dataset


def make_train_dataset(
    root,
    case_ids,
    spec: StageSpec,
    *,
    cache_dir,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    balance_landmarks: int = 0,
) -> grain.IterDataset:
    """Shuffled, repeated, augmented raw batches of a stage (caches the cases first).

    Args:
        root: data set folder.
        case_ids: training cases (``select_case_ids``); cases without landmarks are skipped.
        spec: stage settings.
        cache_dir: stage cache folder.
        batch_size: samples per batch (the last incomplete batch of a finite run is dropped).
        seed: shuffling and augmentation seed (0 <= seed < 2**32).
        num_workers: worker processes (0: in this process); the batches do not depend on it.
        num_epochs: None repeats forever.
        shard_index, shard_count: this process's share of the sample sequence (multi-host:
            `jax.process_index()`, `jax.process_count()`): items shard_index, shard_index +
            shard_count, ... of the global sequence, each with the same augmentation draw as in a
            single-process run; `batch_size` is then the per-process batch.
        balance_landmarks: 0 (each item once per epoch, as the reference) or the most repeats
            of a case holding rare landmarks (``landmark_balance_repeats``; "spine" and "scn").

    Returns:
        IterDataset of raw batches (``samples`` module docstring); ``iter()`` gives an iterator
        with ``get_state()`` / ``set_state()``.
    """
    prepared = _prepare(root, list(case_ids), spec, cache_dir)
    size = samples.box_size(spec, prepared.volume_sizes, train=True)
    items = [(c, v, True) for c, v in prepared.items]
    if balance_landmarks:
        if spec.name == "seg":
            raise ValueError("balance_landmarks: stage 'seg' samples vertebrae, not cases")
        repeats = landmark_balance_repeats(np.stack(prepared.valid), balance_landmarks)
        items = [item for item in items for _ in range(repeats[item[0]])]
    maker = _MakeSample(prepared.paths, spec, size, seed=seed, epoch_length=len(items), train=True)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    dataset = grain.MapDataset.source(items).shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.map_with_index(maker)[shard_index::shard_count]
    return _finish(dataset, batch_size, num_workers)


def make_eval_dataset(
    root, case_ids, spec: StageSpec, *, cache_dir, batch_size: int, num_workers: int = 0
) -> grain.IterDataset:
    """Every item of the held-out cases once, without augmentation (identity parameters).

    The "scn" crop is the slab centred in z at the landmarks' mean x, y. The last batch is padded
    with copies of the last item marked ``example_mask`` False, so every batch has one shape.
    """
    prepared = _prepare(root, list(case_ids), spec, cache_dir)
    size = samples.box_size(spec, prepared.volume_sizes, train=False)
    items = [(c, v, True) for c, v in prepared.items]
    items += [(*prepared.items[-1], False)] * (-len(items) % batch_size)
    maker = _MakeSample(prepared.paths, spec, size, seed=0, epoch_length=len(items), train=False)
    return _finish(grain.MapDataset.source(items).map_with_index(maker), batch_size, num_workers)
