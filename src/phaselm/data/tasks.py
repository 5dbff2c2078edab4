"""Synthetic sequence tasks: where could phase coupling help? (recall, copying, grouping)

Every generator is deterministic from a seed and returns ``(inputs, targets)``, two int64 arrays
``[n, seq_len]``. ``targets[i, t]`` is the token the model must predict after reading
``inputs[i, :t+1]``, and ``-1`` (ignored) everywhere but the answer positions, so the loss and the
accuracy count answers only.

* **MQAR** (multi-query associative recall, Zoology, Arora et al. 2023): ``num_kv_pairs`` distinct
  keys from ``[1, V/2)`` and distinct values from ``[V/2, V)`` come first as ``k1 v1 k2 v2 …``
  (2·kv tokens). In the remaining L − 2·kv positions each key appears once more as a query, at
  position 2·kv + 2·g with gaps g drawn without replacement from ``{0, …, (L − 2kv)/2 − 1}`` with
  p(g) ∝ a·(g+1)^(a−1) (a = ``power_a`` = 0.01: short gaps are likelier, as repeats in text are);
  the target at a query is its value. All other positions hold the token 0 (never a key or a
  value), or with ``random_fill`` uniform random tokens from ``[0, V)`` (Zoology's
  ``random_non_queries``; its Figure 2 configurations, which the validity check reproduces, turn
  it off). Needs 4·kv ≤ L and V > L.
* **Selective copying** (Mamba, Gu & Dao 2023; MAD's configuration): ``num_tokens`` content tokens
  from ``[0, V−2)`` at sorted uniformly random positions among the first L − n − 1, blanks
  (``V−2``) elsewhere, then the copy marker (``V−1``) and n blanks; at those last n positions the
  targets are the content tokens in order. (MAD inserts its blanks only before the last content
  token, which then always sits just before the marker; here it does not.)
* **Noisy recall** (MAD's noisy in-context recall, multi-query): a sequence of L/2 two-token
  motifs; each is noise (two tokens from the ``noise_vocab`` tokens ``[V−noise, V)``) with
  probability ``frac_noise``, else a key from ``[0, K/2)`` followed by its value from
  ``[K/2, K)`` (K = V − noise; the value of a key is fixed within a sequence). A key's value is a
  target whenever that key was shown before in the sequence; the last motif is always a key shown
  before, so every sequence has an answer.
* **Fuzzy recall** (MAD's fuzzy in-context recall, multi-query): as recall, but keys and values are
  motifs of 1–``k_motif`` / 1–``v_motif`` distinct tokens (keys from ``[0, K/2)``, values from
  ``[K/2, K)``, K = V − 1), left-padded with the pad token ``V−1``; every value token of a key shown
  before is a target. Training examples use keys of every size; held-out examples use keys of the
  largest size only, as MAD evaluates.

``TaskData`` holds a task's training and held-out examples: the held-out set comes from its own
seed stream and keeps no input sequence that also occurs in the training set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from phaselm.utils import atomic_write, cache_dir

IGNORE = -1
GENERATOR_VERSION = 1  # raise when a generator's output changes (cached sets are keyed by it)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per (seed, stream), e.g. the train and the test examples."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Task:
    """Base of the task specs: a name, a length and a vocabulary; ``generate(n, rng)``."""

    seq_len: int
    vocab_size: int
    name = "task"

    def check(self) -> None:
        if self.seq_len < 4 or self.vocab_size < 4:
            raise ValueError(f"data: {self.name} needs seq_len >= 4 and vocab_size >= 4, got "
                             f"{self.seq_len}, {self.vocab_size}")

    def generate(self, n: int, rng: np.random.Generator, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        fields = ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name} ({fields})"


@dataclass(frozen=True)
class MQAR(Task):
    seq_len: int = 64
    vocab_size: int = 8192
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_fill: bool = False
    name = "mqar"

    def check(self) -> None:
        super().check()
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len or self.seq_len % 2:
            raise ValueError(f"data: mqar needs an even seq_len >= 4 * num_kv_pairs, got seq_len {self.seq_len}, "
                             f"num_kv_pairs {self.num_kv_pairs}")
        if self.vocab_size <= self.seq_len or self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"data: mqar needs vocab_size > seq_len and room for {self.num_kv_pairs} distinct keys, "
                             f"got vocab_size {self.vocab_size}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"data: mqar power_a must be in (0, 1], got {self.power_a}")

    def generate(self, n, rng, held_out=False):
        L, V, kv = self.seq_len, self.vocab_size, self.num_kv_pairs
        half, ctx = V // 2, 2 * self.num_kv_pairs
        space = (L - ctx) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        p /= p.sum()
        inputs = rng.integers(0, V, size=(n, L)) if self.random_fill else np.zeros((n, L), dtype=np.int64)
        targets = np.full((n, L), IGNORE, dtype=np.int64)
        rows = np.arange(n)[:, None]
        keys = np.stack([rng.choice(np.arange(1, half), kv, replace=False) for _ in range(n)])
        values = np.stack([rng.choice(np.arange(half, V), kv, replace=False) for _ in range(n)])
        gaps = np.stack([rng.choice(space, kv, replace=False, p=p) for _ in range(n)])
        inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
        query = ctx + 2 * gaps
        inputs[rows, query] = keys
        targets[rows, query] = values
        return inputs.astype(np.int64), targets


@dataclass(frozen=True)
class SelectiveCopy(Task):
    seq_len: int = 256
    vocab_size: int = 16
    num_tokens: int = 16
    name = "selective_copy"

    def check(self) -> None:
        super().check()
        if self.num_tokens < 1 or self.seq_len <= 2 * self.num_tokens + 1:
            raise ValueError(f"data: selective_copy needs seq_len > 2 * num_tokens + 1, got seq_len {self.seq_len}, "
                             f"num_tokens {self.num_tokens}")

    def generate(self, n, rng, held_out=False):
        L, V, k = self.seq_len, self.vocab_size, self.num_tokens
        blank, marker = V - 2, V - 1
        inputs = np.full((n, L), blank, dtype=np.int64)
        targets = np.full((n, L), IGNORE, dtype=np.int64)
        content = rng.integers(0, V - 2, size=(n, k))
        where = np.sort(np.stack([rng.choice(L - k - 1, k, replace=False) for _ in range(n)]), axis=1)
        inputs[np.arange(n)[:, None], where] = content
        inputs[:, L - k - 1] = marker
        targets[:, L - k:] = content
        return inputs, targets


@dataclass(frozen=True)
class NoisyRecall(Task):
    seq_len: int = 128
    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = 0.2
    name = "noisy_recall"

    def check(self) -> None:
        super().check()
        if self.seq_len % 2:
            raise ValueError(f"data: {self.name} needs an even seq_len, got {self.seq_len}")
        if not 0 <= self.frac_noise < 1 or not 0 <= self.noise_vocab_size <= self.vocab_size - 4:
            raise ValueError(f"data: {self.name} needs frac_noise in [0, 1) and noise_vocab_size <= vocab_size - 4, got "
                             f"{self.frac_noise}, {self.noise_vocab_size}")
        if self.frac_noise > 0 and self.noise_vocab_size < 1:
            raise ValueError(f"data: {self.name} with frac_noise > 0 needs noise_vocab_size >= 1")

    def generate(self, n, rng, held_out=False):
        V, k, motifs = self.vocab_size, self.vocab_size - self.noise_vocab_size, self.seq_len // 2
        keys_n = k // 2
        rows = np.arange(n)[:, None]
        table = rng.integers(keys_n, k, size=(n, keys_n))  # each sequence's value of every key
        key = rng.integers(0, keys_n, size=(n, motifs - 1))
        noise = rng.random((n, motifs - 1)) < self.frac_noise
        noise[np.arange(n), rng.integers(0, motifs - 1, size=n)] = False  # at least one real pair
        shown = np.zeros((n, motifs - 1, keys_n), dtype=np.int64)
        shown[rows, np.arange(motifs - 1), key] = ~noise
        before = np.cumsum(shown, axis=1) - shown  # times each key was shown before motif j
        seen = before[rows, np.arange(motifs - 1), key] > 0
        probe = np.argmax(np.where(shown.any(axis=1), rng.random((n, keys_n)), -1.0), axis=1)  # a shown key
        pairs = np.stack([key, table[rows, key]], axis=-1)  # [n, motifs-1, 2]
        pairs = np.where(noise[..., None], rng.integers(k, V, size=pairs.shape) if V > k else pairs, pairs)
        answer = np.full((n, motifs, 2), IGNORE, dtype=np.int64)
        answer[:, :-1, 1] = np.where(seen & ~noise, pairs[..., 1], IGNORE)
        last = np.stack([probe, table[np.arange(n), probe]], axis=-1)[:, None]
        answer[:, -1, 1] = last[:, 0, 1]
        # a random first token, then the motifs; targets[t] is the token after inputs[t]
        tokens = np.concatenate([rng.integers(0, V, size=(n, 1)), pairs.reshape(n, -1), last.reshape(n, 2)], axis=1)
        answer = np.concatenate([np.full((n, 1), IGNORE), answer.reshape(n, -1)], axis=1)
        return tokens[:, :-1], answer[:, 1:]


@dataclass(frozen=True)
class FuzzyRecall(Task):
    seq_len: int = 128
    vocab_size: int = 16
    k_motif: int = 3
    v_motif: int = 3
    name = "fuzzy_recall"

    def check(self) -> None:
        super().check()
        k = self.vocab_size - 1
        if self.k_motif < 1 or self.v_motif < 1 or max(self.k_motif, self.v_motif) > k // 2:
            raise ValueError(f"data: fuzzy_recall needs 1 <= k_motif, v_motif <= (vocab_size - 1) // 2, got "
                             f"{self.k_motif}, {self.v_motif}")
        if self.seq_len < 4 * (self.k_motif + self.v_motif):
            raise ValueError(f"data: fuzzy_recall needs seq_len >= 4 * (k_motif + v_motif), got {self.seq_len}")

    def generate(self, n, rng, held_out=False):
        pad, k = self.vocab_size - 1, self.vocab_size - 1
        key_vocab, value_vocab = range(k // 2), range(k // 2, k)
        key_sizes = [self.k_motif] if held_out else list(range(1, self.k_motif + 1))
        keys = {s: list(permutations(key_vocab, s)) for s in key_sizes}
        values = {s: list(permutations(value_vocab, s)) for s in range(1, self.v_motif + 1)}
        room = self.seq_len + 1 - (self.k_motif + self.v_motif)
        tokens = np.full((n, self.seq_len + 1), pad, dtype=np.int64)
        answer = np.full((n, self.seq_len + 1), IGNORE, dtype=np.int64)
        for i in range(n):
            kv, seq, tgt = {}, [], []
            while True:
                ks = key_sizes[rng.integers(len(key_sizes))]
                key = keys[ks][rng.integers(len(keys[ks]))]
                if key in kv:
                    value = kv[key]
                else:
                    vs = int(rng.integers(1, self.v_motif + 1))
                    value = values[vs][rng.integers(len(values[vs]))]
                if len(seq) + len(key) + len(value) > room:
                    break
                seq += [*key, *value]
                tgt += [IGNORE] * len(key) + (list(value) if key in kv else [IGNORE] * len(value))
                kv[key] = value
            probe = list(kv)[rng.integers(len(kv))]  # the last motif: a key shown before
            seq += [*probe, *kv[probe]]
            tgt += [IGNORE] * len(probe) + list(kv[probe])
            tokens[i, -len(seq):], answer[i, -len(tgt):] = seq, tgt
        return tokens[:, :-1], answer[:, 1:]


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, SelectiveCopy, NoisyRecall, FuzzyRecall)}
DEFAULT_SIZES = {"num_train": 12_800, "num_test": 2_000, "data_seed": 0}


def make_task(name: str, **params) -> Task:
    """The task ``name`` with ``params`` (None values take the task's defaults), checked."""
    if name not in TASKS:
        raise ValueError(f"data.name: unknown task {name!r} (tasks: {', '.join(TASKS)})")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in params.items() if v is not None}
    if unknown := sorted(set(given) - known):
        raise ValueError(f"data.{unknown[0]} does not apply to task {name} (its settings: {', '.join(sorted(known))})")
    task = cls(**given)
    task.check()
    return task


def _row_keys(inputs: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(inputs)]


@dataclass
class TaskData:
    """A task's examples: ``train``, and the held-out ``val`` (for choices such as the learning
    rate) and ``test`` (for the reported accuracy) sets, each ``(inputs, targets)`` ``[n, L]``.
    Held-out sets come from their own seed streams and hold no input sequence of the training set."""

    task: Task
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @classmethod
    def build(cls, task: Task, num_train: int, num_test: int, seed: int = 0, cache: bool = False) -> "TaskData":
        """Generate the sets (``cache``: reuse them from ``$PHASELM_CACHE_DIR/tasks``, where the
        first build stores them; the same arguments always give the same arrays)."""
        if num_train < 1 or num_test < 1:
            raise ValueError(f"data: num_train and num_test must be >= 1, got {num_train}, {num_test}")
        key = hashlib.sha256(f"{GENERATOR_VERSION}:{task!r}:{num_train}:{num_test}:{seed}".encode()).hexdigest()[:20]
        path = cache_dir() / "tasks" / f"{task.name}-{key}.npz"
        if cache and path.exists():
            with np.load(path) as f:
                return cls(task, *((f[f"{s}_x"], f[f"{s}_y"]) for s in ("train", "val", "test")))
        train = task.generate(num_train, _rng(seed, f"{task.name}:train"))
        seen = set(_row_keys(train[0]))
        held = [cls._held_out(task, num_test, _rng(seed, f"{task.name}:{split}"), seen) for split in ("val", "test")]
        data = cls(task, train, *held)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, **{f"{s}_{k}": a for s in ("train", "val", "test") for k, a in zip("xy", getattr(data, s))})
            atomic_write(path, buf.getvalue())
        return data

    @staticmethod
    def _held_out(task: Task, n: int, rng: np.random.Generator, seen: set) -> tuple[np.ndarray, np.ndarray]:
        parts, have = [], 0
        for _ in range(20):
            x, y = task.generate(n, rng, held_out=True)
            fresh = np.array([k not in seen for k in _row_keys(x)])
            parts.append((x[fresh], y[fresh]))
            have += int(fresh.sum())
            if have >= n:
                return tuple(np.concatenate(p)[:n] for p in zip(*parts))
        raise ValueError(f"data: {task.describe()} has too few distinct sequences for {n} held-out examples "
                         "outside the training set; raise seq_len or vocab_size")

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size
