"""Early exit: answer a clearly harmless user turn from the guard model's first layers.

Most traffic is harmless, and most harmless turns are plain enough that the model's first layers already tell. With
early exit on (``guard.early_exit``), the guard model's graph is cut after one encoder layer (``ExitSpec.layer``,
0-based) into two ONNX sessions: the first runs the embeddings and the layers up to the cut, the second the rest
and the heads. A linear head on the mean of the cut layer's states estimates whether the whole model would score the
turn at or above ``harm_line`` for harm, or ``jailbreak_line`` for jailbreak (operating scale, where the calibrated
threshold is 0.5). Below the spec's ``threshold`` the turn exits, unless it is shorter than ``min_ids`` ids: the
head is weakest on terse asks, and a short turn's whole pass costs little anyway. An exited turn's harm and
jailbreak are linear estimates of the whole model's logits from the same states, capped just below those lines;
its category is ``none`` and it has no embedding (``PromptScore.exited``). Every other turn runs the remaining
layers; their outputs are bit for bit those of the whole graph, because the two sessions run the whole graph's own
nodes on the same tensors.

The conversation window pass (the recent turns together, ``guard.window_max_ids`` ids) exits on a head of its own,
the spec's ``window``, fitted the same way on windows (the per-turn head lets windows exit that the whole model
scores 0.96 and more: ``bench.window_exit``). It serves only a window pass at the length it was fitted for
(``max_ids``); a spec without it lets no window exit. The head reads the mean of the window's early states, where one
harmful turn after long harmless ones is diluted, so the tracker lets a window exit only when its trajectory and
its last four user turns (every user turn in the window among them) read below the window head's ``harm_line`` on
their own (``ConversationTracker``'s ``_window_exact``). An exited window makes the request's ``estimated`` true,
as an exited turn does.

The spec's optional ``window_estimate`` (``WindowEstimate``) decides whether the window pass runs at all. Every
per-turn check through the cut (exited, gone on, or exact through both parts) keeps its pooled cut-layer state,
projected to a few numbers (``PromptScore.state``). From those of the window's user turns and their own harm, a
small MLP estimates the whole model's window harm; below its ``gate`` the tracker skips the pass and reports the
estimate as the window's harm (the request's ``estimated`` is then true). So request N+1 of a harmless conversation
costs one turn pass. A window whose user turn has no state (scored by the whole model without the cut, or by another
replica), and every window of an exact request, runs the pass. The estimate is fitted by ``python -m
bench.window_from_turns --write DIR`` against the whole model's windows of the train split, its gate chosen on the
calibration split (``bench/RESULTS.md``, "The window estimated from the turns' own states").

Reply pairs and ``exact=True`` calls (which need the embedding: a refused request joining the tenant's refusal
memory, drill clustering) always run the whole model: both parts, one after the other. For a tenant with refusals in
memory, the conversation tracker runs the whole model on an exited turn only when its rephrase similarity could
change what a loaded policy or drill sampling reads (``ConversationTracker``'s ``rephrase_check``).

The classifier keeps only the two parts, so early exit costs no second copy of the weights. The cut is made once, at
load, in a child process (``python -m guardproxy.early_exit MODEL TAP DIR``): the ``onnx`` package's copies of the
graph would otherwise stay in the gateway's heap (~60 MiB measured). With both, the gateway's RSS is 12 MiB above
the whole model's. The cut costs about 1.5 s, most of it the child importing ``onnx``, so the gateway keeps the parts
in a cache directory (``guard.early_exit_cache``, by default ``~/.cache/guardproxy/early-exit``), one entry per
model md5 and cut (``cached_cut``), with the md5 of each part; a later start checks them and loads the parts from
there. An entry whose parts do not match their md5s, or that cannot be loaded, is removed and the graph cut afresh; a
cache that cannot be written only costs the cut at each start.

The head is fitted by ``python -m guardproxy.training.early_exit`` against the whole model's own verdicts on the
train split, not against the labels. Its threshold is set on the calibration split (the share of the whole model's
flags that may exit, ``--miss``), and it is reported on the dev split. The spec names the md5 of the ``model.onnx``
it was fitted on. A spec for another graph is refused at load, so a replaced model never runs with a stale head.

A policy that reads harm below ``harm_line`` (or jailbreak below ``jailbreak_line``, or window harm below the
window head's ``harm_line``) would judge exited turns on the estimates, so every turn and window of a request under
such a policy, active or shadow, runs the whole model
(``guardproxy.guard.below_exit_lines``; logged once per policy at start and on each reload). Requests under other
policies still exit. Fit the head for the lowest line any policy uses to let all of them exit. The shipped spec
uses 0.15, the lowest harm line of ``policies/``.

``guard.early_exit`` is ``auto`` by default: early exit where the model directory's ``early_exit.json`` fits its
``model.onnx``, the whole model otherwise (a missing spec is logged at info, an unfit one or a failed cut as a
warning). ``true`` makes a missing or unfit spec stop the start; ``false`` never loads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardproxy.errors import ClassifierError

__all__ = [
    "PART_FILES",
    "PARTS_MD5",
    "SPEC_FILE",
    "ExitSpec",
    "Head",
    "Linear",
    "WindowEstimate",
    "WindowHead",
    "cache_entry",
    "cached_cut",
    "cut_in_child",
    "file_md5",
    "load_spec",
    "pooled",
    "score_logit",
    "split_graph",
    "tap_name",
]

logger = logging.getLogger(__name__)

SPEC_FILE = "early_exit.json"
PART_FILES = ("first.onnx", "rest.onnx")
PARTS_MD5 = "parts.md5.json"  # in a cache entry: the md5 of each part, written with them
CUT_TIMEOUT_S = 120.0
FORMAT = 1
CAP_MARGIN = 1e-3  # exited estimates are reported at most this far below the spec's lines


@dataclass(frozen=True)
class Linear:
    """``x @ weights + bias`` on the pooled states of the cut layer."""

    weights: npt.NDArray[np.float32]
    bias: float

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return (x @ self.weights + np.float32(self.bias)).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights], "bias": float(self.bias)}


@dataclass(frozen=True)
class Head:
    """One exit: a linear head on the cut layer's pooled states, the threshold below which a row exits, and the
    estimates an exited row reports."""

    exit: Linear  # its logit: "the whole model would keep this row"; exit when below ``threshold``
    threshold: float
    harm: Linear  # estimates of the whole model's harm and jailbreak logits (raw scale)
    jailbreak: Linear
    harm_line: float  # operating-scale lines the head was fitted for
    jailbreak_line: float
    min_ids: int  # a row of fewer ids (special ids included) never exits

    def exits(self, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which rows exit, from their pooled states ``x`` and their id counts."""
        out: npt.NDArray[np.bool_] = (self.exit(x) < self.threshold) & (ids >= self.min_ids)
        return out

    @property
    def harm_cap(self) -> float:
        return self.harm_line - CAP_MARGIN

    @property
    def jailbreak_cap(self) -> float:
        return self.jailbreak_line - CAP_MARGIN

    def to_json(self) -> dict[str, Any]:
        return {
            "exit": self.exit.to_json(),
            "threshold": self.threshold,
            "harm": self.harm.to_json(),
            "jailbreak": self.jailbreak.to_json(),
            "harm_line": self.harm_line,
            "jailbreak_line": self.jailbreak_line,
            "min_ids": self.min_ids,
        }


@dataclass(frozen=True)
class WindowHead(Head):
    """The conversation window's exit: a head of its own, fitted on windows read at ``max_ids`` ids; a window pass
    at another length never exits."""

    max_ids: int = 96
    fit: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"max_ids": self.max_ids, **super().to_json(), "fit": self.fit}


@dataclass(frozen=True)
class WindowEstimate:
    """The conversation window's harm estimated from its user turns' own states, as the window pass's gate.

    Every per-turn check that goes through the cut leaves the mean of the cut layer's states; ``project`` keeps
    ``dims`` numbers of it (a PCA fitted on training messages), which ``PromptScore.state`` carries. ``estimate``
    reads the newest user turn's projection, the mean of the window's other user turns' projections, their product
    and the user turns' own harm (the newest's and the highest, as logits) through a small MLP (ReLU) fitted to the
    whole model's window logit on the operating scale. The tracker runs the window pass only where the estimate
    reaches ``gate`` (``ConversationTracker``'s ``_estimated_window``), so a harmless conversation's request costs
    one turn pass. Fitted by ``python -m bench.window_from_turns --write DIR``; what it measured is in ``fit``.
    """

    mean: npt.NDArray[np.float32]  # (hidden,): the PCA's
    components: npt.NDArray[np.float32]  # (dims, hidden)
    scale_mean: npt.NDArray[np.float32]  # (3 * dims + 2,): the features' standardization
    scale_std: npt.NDArray[np.float32]
    hidden_weights: npt.NDArray[np.float32]  # (3 * dims + 2, units)
    hidden_bias: npt.NDArray[np.float32]  # (units,)
    out_weights: npt.NDArray[np.float32]  # (units,)
    out_bias: float
    gate: float  # operating scale: the window pass runs where the estimate reaches it
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """Names the projection (PCA mean and components): states kept in shared conversation state under another
        one (another model, another fit) are not read (``conversation.state.unpack_turn_states``)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(np.ascontiguousarray(self.mean, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.components, "<f4").tobytes())
        return h.digest()

    def project(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Rows of pooled cut-layer states -> rows of ``dims`` numbers."""
        out: npt.NDArray[np.float32] = ((x - self.mean) @ self.components.T).astype(np.float32)
        return out

    def estimate(
        self, newest: npt.NDArray[np.float32], others: Sequence[npt.NDArray[np.float32]], harms: Sequence[float]
    ) -> float:
        """The window's harm on the operating scale. ``newest``: the newest user turn's projection; ``others``:
        the window's other user turns' (may be none); ``harms``: the window's user turns' own harm, newest last."""
        ctx = np.mean(np.stack(others), axis=0) if others else np.zeros_like(newest)
        scalars = np.array([score_logit(harms[-1]), max(score_logit(h) for h in harms)], dtype=np.float32)
        z = (np.concatenate([newest, ctx, newest * ctx, scalars]) - self.scale_mean) / self.scale_std
        h = np.maximum(z @ self.hidden_weights + self.hidden_bias, 0.0)
        y = float(h @ self.out_weights) + self.out_bias
        return 1.0 / (1.0 + math.exp(-min(max(y, -60.0), 60.0)))

    def to_json(self) -> dict[str, Any]:
        def rows(a: npt.NDArray[np.float32]) -> Any:
            return [[float(v) for v in r] for r in a] if a.ndim == 2 else [float(v) for v in a]

        return {
            "gate": self.gate,
            "mean": rows(self.mean),
            "components": rows(self.components),
            "scale_mean": rows(self.scale_mean),
            "scale_std": rows(self.scale_std),
            "hidden_weights": rows(self.hidden_weights),
            "hidden_bias": rows(self.hidden_bias),
            "out_weights": rows(self.out_weights),
            "out_bias": self.out_bias,
            "fit": self.fit,
        }


def score_logit(p: float) -> float:
    """The logit of a score, clipped to [1e-4, 1 - 1e-4]: how ``WindowEstimate`` reads harms (and is fitted)."""
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class ExitSpec(Head):
    """What ``early_exit.json`` holds (see the module docstring): the cut, the per-turn head (this object's
    ``Head`` fields, at the top level of the file), and optionally the window's head (``"window"``)."""

    # Defaults only because fields after Head's must have them: load_spec and the fit always set all three.
    model_md5: str = ""
    layer: int = 0
    tap: str = ""  # the cut layer's output tensor in the graph
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fitted and what it measured (read by people)
    window: WindowHead | None = None
    window_estimate: WindowEstimate | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": FORMAT, "model_md5": self.model_md5, "layer": self.layer, "tap": self.tap}
        doc.update(super().to_json())
        doc["fit"] = self.fit
        if self.window is not None:
            doc["window"] = self.window.to_json()
        if self.window_estimate is not None:
            doc["window_estimate"] = self.window_estimate.to_json()
        return doc


def file_md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _linear(doc: Any, dim: int, where: str) -> Linear:
    if not isinstance(doc, dict) or not isinstance(doc.get("weights"), list) or len(doc["weights"]) != dim:
        raise ValueError(f"{where}: expected {{'weights': [{dim} numbers], 'bias': number}}")
    bias = doc.get("bias")
    if not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ValueError(f"{where}: bias must be a finite number")
    weights = np.asarray(doc["weights"], dtype=np.float32)
    if not np.all(np.isfinite(weights)):
        raise ValueError(f"{where}: weights must be finite numbers")
    return Linear(weights, float(bias))


def _head_fields(doc: dict[str, Any], dim: int, where: str) -> dict[str, Any]:
    """The ``Head`` fields of a spec's (or its window's) object; ``ValueError`` naming the bad key."""
    min_ids = doc.get("min_ids")
    if not isinstance(min_ids, int) or min_ids < 0:
        raise ValueError(f"{where}min_ids must be a count of ids")
    numbers = {k: doc.get(k) for k in ("threshold", "harm_line", "jailbreak_line")}
    for key, value in numbers.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}{key} must be a finite number")
    for key in ("harm_line", "jailbreak_line"):
        if not 0 < float(numbers[key]) <= 1:  # type: ignore[arg-type]
            raise ValueError(f"{where}{key} must lie in (0, 1] on the operating scale")
    return {
        "exit": _linear(doc.get("exit"), dim, f"{where}exit"),
        "threshold": float(numbers["threshold"]),  # type: ignore[arg-type]
        "harm": _linear(doc.get("harm"), dim, f"{where}harm"),
        "jailbreak": _linear(doc.get("jailbreak"), dim, f"{where}jailbreak"),
        "harm_line": float(numbers["harm_line"]),  # type: ignore[arg-type]
        "jailbreak_line": float(numbers["jailbreak_line"]),  # type: ignore[arg-type]
        "min_ids": min_ids,
    }


def _window_head(doc: Any, dim: int) -> WindowHead | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValueError("window: expected an object (the window's head) or no key")
    max_ids = doc.get("max_ids")
    if not isinstance(max_ids, int) or max_ids < 8:
        raise ValueError("window.max_ids must be the window's length in ids (at least 8)")
    fit = doc.get("fit")
    return WindowHead(**_head_fields(doc, dim, "window."), max_ids=max_ids, fit=fit if isinstance(fit, dict) else {})


def _array(doc: Any, key: str, shape: tuple[int | None, ...]) -> npt.NDArray[np.float32]:
    """``doc[key]`` as a finite float32 array of ``shape`` (None: any length); ``ValueError`` naming the key."""
    try:
        a = np.asarray(doc.get(key), dtype=np.float32)
    except (TypeError, ValueError):
        a = np.zeros(0, dtype=np.float32)
    if a.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, a.shape, strict=True)):
        want = " x ".join("n" if n is None else str(n) for n in shape)
        raise ValueError(f"window_estimate.{key}: expected {want} numbers")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"window_estimate.{key}: must be finite numbers")
    return a


def _window_estimate(doc: Any, dim: int) -> WindowEstimate | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValueError("window_estimate: expected an object (the window's estimate) or no key")
    components = _array(doc, "components", (None, dim))
    features = 3 * components.shape[0] + 2
    hidden = _array(doc, "hidden_weights", (features, None))
    units = hidden.shape[1]
    gate, out_bias = doc.get("gate"), doc.get("out_bias")
    if not isinstance(gate, int | float) or not 0 < gate <= 1:
        raise ValueError("window_estimate.gate must lie in (0, 1] on the operating scale")
    if not isinstance(out_bias, int | float) or not math.isfinite(out_bias):
        raise ValueError("window_estimate.out_bias must be a finite number")
    scale_std = _array(doc, "scale_std", (features,))
    if np.any(scale_std <= 0):
        raise ValueError("window_estimate.scale_std must be positive")
    fit = doc.get("fit")
    return WindowEstimate(
        mean=_array(doc, "mean", (dim,)),
        components=components,
        scale_mean=_array(doc, "scale_mean", (features,)),
        scale_std=scale_std,
        hidden_weights=hidden,
        hidden_bias=_array(doc, "hidden_bias", (units,)),
        out_weights=_array(doc, "out_weights", (units,)),
        out_bias=float(out_bias),
        gate=float(gate),
        fit=fit if isinstance(fit, dict) else {},
    )


def load_spec(path: Path, *, model_md5: str, dim: int) -> ExitSpec:
    """Read ``early_exit.json``; ``ClassifierError`` naming the file for anything that cannot serve this model."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClassifierError(f"{path}: cannot read the early-exit spec: {exc}") from exc
    try:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format: expected {FORMAT}")
        if doc.get("model_md5") != model_md5:
            raise ValueError(
                f"fitted on a model.onnx with md5 {doc.get('model_md5')}, this one has {model_md5}: refit it "
                "(python -m guardproxy.training.early_exit)"
            )
        layer, tap = doc.get("layer"), doc.get("tap")
        if not isinstance(layer, int) or layer < 0 or not isinstance(tap, str) or not tap:
            raise ValueError("layer (a layer index) and tap (a tensor name) are required")
        return ExitSpec(
            **_head_fields(doc, dim, ""),
            model_md5=model_md5,
            layer=layer,
            tap=tap,
            fit=fit if isinstance(fit := doc.get("fit"), dict) else {},
            window=_window_head(doc.get("window"), dim),
            window_estimate=_window_estimate(doc.get("window_estimate"), dim),
        )
    except ValueError as exc:
        raise ClassifierError(f"{path}: {exc}") from exc


def tap_name(graph: Any, layer: int) -> str:
    """The output tensor of encoder layer ``layer`` (its last LayerNormalization) in an exported guard graph."""
    marker = f"layer.{layer}/output/LayerNorm"
    names = [str(n.output[0]) for n in graph.node if n.op_type == "LayerNormalization" and marker in n.name]
    if len(names) != 1:
        raise ValueError(f"the graph has no single output of encoder layer {layer} ({marker!r})")
    return names[0]


def split_graph(model_path: Path, tap: str) -> tuple[bytes, bytes]:
    """(first, rest): the serialized ONNX graphs up to ``tap`` and from it to the model's outputs. ``rest`` takes
    ``input_ids`` (for shapes), ``attention_mask``, ``pool_mask`` where the model has it, and ``tap``."""
    import onnx  # only where early exit is on: the split happens once, at load
    import onnx.utils

    model = onnx.load(str(model_path))
    extractor = onnx.utils.Extractor(model)
    outputs = [o.name for o in model.graph.output]
    inputs = [i.name for i in model.graph.input]
    first = extractor.extract_model(inputs, [tap])
    rest = extractor.extract_model([n for n in inputs if n != "token_type_ids"] + [tap], outputs)
    for part in (first, rest):
        onnx.checker.check_model(part)
    return first.SerializeToString(), rest.SerializeToString()


def cut_in_child(model_path: Path, tap: str, directory: Path) -> tuple[Path, Path]:
    """``split_graph`` in a child process, the two parts written to ``directory``; ``ValueError`` with the child's
    last line when it fails."""
    paths = tuple(directory / name for name in PART_FILES)
    argv = [sys.executable, "-m", "guardproxy.early_exit", str(model_path), tap, str(directory)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CUT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"cutting the graph took over {CUT_TIMEOUT_S:g} s") from exc
    if done.returncode != 0 or not all(p.is_file() for p in paths):
        lines = (done.stderr or done.stdout or "no output").strip().splitlines() or ["no output"]
        raise ValueError(lines[-1])
    return paths[0], paths[1]


def cache_entry(cache: Path, model_md5: str, tap: str) -> Path:
    """The directory of ``cache`` that holds the parts of the model with this md5 cut at ``tap``."""
    return cache / f"{model_md5}-{hashlib.sha256(tap.encode()).hexdigest()[:16]}"


def cached_cut(model_path: Path, model_md5: str, tap: str, cache: Path) -> tuple[Path, Path]:
    """The two parts of ``model_path`` cut at ``tap``, from ``cache`` (``cache_entry``); cut there by ``cut_in_child``
    the first time. The cut is written to a fresh directory with the md5 of each part (``PARTS_MD5``) and renamed into
    place, so a crash never leaves a half entry behind, and of two processes cutting at once the first rename wins
    and the other uses it. An entry whose parts do not match their md5 (a damaged disk, an interrupted copy of the
    cache, an entry written before the md5s were kept) is logged, removed and cut afresh. The md5s catch damage, not
    tampering: whoever can write the cache can rewrite them too. ``OSError`` when ``cache`` cannot be written,
    ``ValueError`` when the cut fails."""
    entry = cache_entry(cache, model_md5, tap)
    paths = (entry / PART_FILES[0], entry / PART_FILES[1])
    if entry.exists():
        damage = _entry_damage(entry)
        if damage is None:
            return paths
        logger.warning("guard.early_exit_cache: %s %s: removed, cutting afresh", entry, damage)
        shutil.rmtree(entry, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    # A uniquely named directory made with the process's umask (``tempfile.mkdtemp`` would make it 0700, and an
    # entry in a cache shared between users would then serve only the user who cut it).
    fresh = cache / f".cut-{uuid.uuid4().hex}"
    fresh.mkdir()
    try:
        logger.info("early exit: cutting %s at %s into the cache %s", model_path, tap, entry)
        cut_in_child(model_path, tap, fresh)
        sums = {name: file_md5(fresh / name) for name in PART_FILES}
        (fresh / PARTS_MD5).write_text(json.dumps(sums, indent=1) + "\n")
        try:
            fresh.rename(entry)
        except OSError:
            if _entry_damage(entry) is not None:  # not another process's finished entry: a real failure
                raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return paths


def _entry_damage(entry: Path) -> str | None:
    """What is wrong with a cache entry (a missing part or md5 file, a part whose md5 differs); None: nothing."""
    try:
        sums = json.loads((entry / PARTS_MD5).read_text())
    except (OSError, ValueError):
        return f"has no readable {PARTS_MD5}"
    for name in PART_FILES:
        try:
            digest = file_md5(entry / name)
        except OSError:
            return f"has no readable {name}"
        if not isinstance(sums, dict) or sums.get(name) != digest:
            return f"has a {name} whose md5 is not the one written with it"
    return None


def pooled(hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Mean of each row's states over its real ids (``attention_mask``)."""
    m = mask[..., None].astype(np.float32)
    out: npt.NDArray[np.float32] = ((hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)).astype(np.float32)
    return out


def _main(argv: list[str]) -> int:
    """The child of ``cut_in_child``: MODEL TAP DIR."""
    model_path, tap, directory = Path(argv[0]), argv[1], Path(argv[2])
    for part, name in zip(split_graph(model_path, tap), PART_FILES, strict=True):
        (directory / name).write_bytes(part)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
