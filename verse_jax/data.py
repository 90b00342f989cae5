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
import json
from pathlib import Path

import grain
import numpy as np
from absl import flags

from verse_jax import io, samples
from verse_jax.stage_cache import load_stage_case, prepare_stage_cases
from verse_jax.stages import StageSpec

NUM_FOLDS = 3
_FOLD_SEED = 0


def read_fold_file(path) -> dict[int, dict[str, list[str]]]:
    """A fixed cross-validation split: ``{"0": {"train": [ids], "val": [ids]}, "1": ..., ...}``.

    Lets a user reproduce given folds (e.g. the original's ``setup/cv/<fold>/{train,val}.txt``
    lists) instead of the seeded random split. ValueError naming the file otherwise.
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the fold file ({error})") from error
    out = {}
    if not isinstance(folds, dict) or not folds:
        raise ValueError(f'{path}: expected {{"0": {{"train": [...], "val": [...]}}, ...}}')
    for key, parts in folds.items():
        ok = isinstance(parts, dict) and set(parts) == {"train", "val"}
        if not (key.isdigit() and ok and all(isinstance(v, list) for v in parts.values())):
            raise ValueError(
                f"{path}: fold {key!r} must be a digit key with 'train' and 'val' lists"
            )
        overlap = sorted(set(parts["train"]) & set(parts["val"]))
        if overlap:
            raise ValueError(f"{path}: fold {key} has cases in both train and val: {overlap}")
        out[int(key)] = {name: [str(i) for i in ids] for name, ids in parts.items()}
    return out


def select_case_ids(
    root, *, split: str | None = None, fold=None, part: str = "train", fold_file=None
) -> list[str]:
    """Case ids of a split, optionally one part of a 3-fold cross-validation inside it.

    Args:
        root: data set folder (``io.find_cases`` layouts; ``splits.json`` when ``split`` is given).
        split: a key of ``root/splits.json`` ("train", "val", "test"), or None for all cases.
        fold: None (the whole split), 0, 1, 2 (cross-validation fold) or "all" (the whole split as
            training data, nothing held out). Folds: the sorted ids, permuted with a fixed seed,
            every third id from position ``fold`` is held out.
        part: "train" or "val" part of the fold.
        fold_file: a fixed split (``read_fold_file``) used for an integer ``fold`` instead of the
            seeded one; its ids must be cases of ``root`` (and of ``split``, if given).
    """
    ids = [case.case_id for case in io.find_cases(root)]
    if split is not None:
        splits = io.read_splits(root)
        if split not in splits:
            raise ValueError(f"{root}/splits.json: no split {split!r} (has {sorted(splits)})")
        known = set(ids)
        missing = [i for i in splits[split] if i not in known]
        if missing:
            raise ValueError(f"{root}/splits.json: split {split!r} names unknown cases {missing}")
        ids = sorted(splits[split])
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if fold is None or fold == "all":
        return ids if part == "train" or fold is None else []
    if fold_file is not None:
        folds = read_fold_file(fold_file)
        if fold not in folds:
            raise ValueError(f"{fold_file}: no fold {fold!r} (has {sorted(folds)})")
        unknown = sorted(set(folds[fold][part]) - set(ids))
        if unknown:
            raise ValueError(
                f"{fold_file}: fold {fold} {part} names cases not in the data {unknown}"
            )
        return sorted(folds[fold][part])
    if fold not in range(NUM_FOLDS):
        raise ValueError(f"fold must be None, 'all' or 0..{NUM_FOLDS - 1}, got {fold!r}")
    order = np.random.default_rng(_FOLD_SEED).permutation(len(ids))
    held_out = {ids[i] for i in order[fold::NUM_FOLDS]}
    return [i for i in ids if (i in held_out) == (part == "val")]


@dataclasses.dataclass(frozen=True)
class _Prepared:
    paths: tuple[str, ...]
    items: tuple[tuple[int, int], ...]  # (case index, landmark index or -1)
    volume_sizes: tuple[tuple[int, int, int], ...]


def _prepare(root, case_ids, spec: StageSpec, cache_dir) -> _Prepared:
    by_id = {case.case_id: case for case in io.find_cases(root)}
    missing = [i for i in case_ids if i not in by_id]
    if missing:
        raise ValueError(f"{root}: unknown case ids {missing}")
    paths = prepare_stage_cases([by_id[i] for i in case_ids], spec, cache_dir)
    items, sizes = [], []
    for index, path in enumerate(paths):
        case = load_stage_case(path)
        sizes.append(tuple(case.image.shape))
        if spec.name == "seg":
            items += [(index, int(k)) for k in np.flatnonzero(case.valid)]
        elif case.valid.any():
            items.append((index, -1))
    if not items:
        raise ValueError(f"{root}: no case among {list(case_ids)} has landmarks for {spec.name}")
    return _Prepared(tuple(str(p) for p in paths), tuple(items), tuple(sizes))


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

    Returns:
        IterDataset of raw batches (``samples`` module docstring); ``iter()`` gives an iterator
        with ``get_state()`` / ``set_state()``.
    """
    prepared = _prepare(root, list(case_ids), spec, cache_dir)
    size = samples.box_size(spec, prepared.volume_sizes, train=True)
    items = [(c, v, True) for c, v in prepared.items]
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
