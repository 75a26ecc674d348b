"""Training configuration: the TrainConfig fields, reading them from TOML and `--set`, and
checking every value against its field's type and range before anything runs or is written.

A mistake is one line that names the key, the value and what is expected:
    training config: epochs=2.5 is not an integer
    training config: dim=0 is out of range (expected >= 1)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from recsys_ccl.errors import RecsysError
from recsys_ccl.model import ModelConfig

__all__ = ["TrainConfig", "parse_override"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Defaults work on dense ratings and sparse check-ins
    alike: cosine towers, τ = 0.1, in-batch softmax with the logQ correction and hit masking."""

    # -- model --
    dim: int = 128  # on Gowalla 64 -> 128 gave +5 % valid NDCG@20 (benchmarks/results)
    user_id_embedding: bool = True
    history_len: int = 50
    history_weight: float = 0.5
    item_history_len: int = 0  # users pooled into the item tower (recsys_ccl/model.py)
    item_history_weight: float = 0.5
    mlp_hidden: tuple[int, ...] = ()
    normalize: bool = True
    temperature: float = 0.1
    learn_temperature: bool = False
    embedding_dropout: float = 0.0
    # a learned per-item logit offset (recsys_ccl/model.py); "auto": on for the losses on
    # logits (infonce, bpr), off for those with margins on cosines (ccl, margin)
    item_bias: bool | Literal["auto"] = "auto"
    # content features (DATA's item_features / user_features): "auto" uses them when the DATA
    # directory has them, "none" trains the id-only model on the same data
    features: Literal["auto", "none"] = "auto"
    feature_combine: Literal["sum", "concat"] = "sum"  # id + features, or concat + linear
    id_dropout: float = 0.0  # drop a row's id embedding in training (features learn alone)
    # -- loss and negatives --
    loss: Literal["infonce", "ccl", "margin", "bpr"] = "infonce"
    logq: bool = True
    logq_weight: float = 1.0  # α in logit - α·log q: 1 is the full correction
    mask_hits: bool = True
    symmetric: bool = False
    extra_negatives: int = 0
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    ccl_margin: float = 0.9
    ccl_negative_weight: float = 150.0
    margin_positive: float = 0.0
    margin_negative: float = 1.0
    loss_impl: Literal["auto", "triton", "torch", "naive"] = "auto"  # contrastive_loss impl
    # -- self-supervised view contrast of user histories (0 = off) --
    ssl_weight: float = 0.0
    ssl_temperature: float = 0.2
    ssl_crop: float = 0.8  # share of the history kept by the random crop
    ssl_mask_prob: float = 0.2  # probability of masking each remaining item
    # -- optimisation --
    optimizer: Literal["adam", "adamw"] = "adam"
    # Adam 0.01 decayed by a half cosine over the run: on Gowalla and on synthetic data at two
    # densities better than a constant 3e-3 (benchmarks/results/check_defaults.md)
    lr: float = 1e-2
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr -> lr·lr_final_ratio
    lr_final_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 2048
    epochs: int = 20
    seed: int = 0
    # -- validation --
    eval_split: Literal["valid", "test", "none"] = "valid"
    eval_k: int = 20
    patience: int = 5  # epochs without a better valid NDCG@K before stopping; 0 = never

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if not _conforms(hint, value):
                raise RecsysError(f"training config: {f.name}={value!r} is not "
                                  f"{_describe(hint)}")
            coerced = _coerce(hint, value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Ranges (types are checked on construction)."""
        for key, (ok, expected) in _RANGES.items():
            value = getattr(self, key)
            if not ok(value, self):
                raise RecsysError(f"training config: {key}={value!r} is out of range "
                                  f"(expected {expected})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecsysError(f"unknown training config keys: {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise RecsysError(f"config file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise RecsysError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RecsysError(f"cannot parse {path}: {exc}") from exc
        flat: dict[str, Any] = {}
        for key, value in raw.items():  # [sections] are only for reading; keys are flat
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls.from_dict({**flat, **(overrides or {})})

    def model_config(self, num_users: int, num_items: int, item_features: dict | None = None,
                     user_features: dict | None = None) -> ModelConfig:
        """The model's configuration; item_features / user_features ({"spec", "shapes"}) are
        used unless features = "none"."""
        use = self.features != "none"
        return ModelConfig(
            item_features=item_features if use else None,
            user_features=user_features if use else None,
            feature_combine=self.feature_combine, id_dropout=self.id_dropout,
            num_users=num_users, num_items=num_items, dim=self.dim,
            user_id_embedding=self.user_id_embedding, history_len=self.history_len,
            history_weight=self.history_weight, item_history_len=self.item_history_len,
            item_history_weight=self.item_history_weight, mlp_hidden=self.mlp_hidden,
            normalize=self.normalize, temperature=self.temperature,
            learn_temperature=self.learn_temperature,
            embedding_dropout=self.embedding_dropout, item_bias=self.uses_item_bias,
        )

    @property
    def uses_item_bias(self) -> bool:
        if self.item_bias == "auto":
            return self.loss in ("infonce", "bpr")
        return bool(self.item_bias)


def _conforms(hint: Any, value: Any) -> bool:
    """Whether `value` (as TOML or Python gives it) fits the field's annotation."""
    origin = get_origin(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_conforms(a, value) for a in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_conforms(item, v) for v in value)
    raise TypeError(f"no check for annotation {hint!r}")


def _coerce(hint: Any, value: Any) -> Any:
    """Numbers for float fields become floats; lists for tuple fields become tuples."""
    if hint is float and not isinstance(value, float):
        return float(value)
    if get_origin(hint) is tuple and not isinstance(value, tuple):
        return tuple(value)
    return value


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return repr(hint)


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
             ) -> tuple[Callable[[Any, TrainConfig], bool], str]:
    def ok(v: Any, _cfg: TrainConfig) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return ok, f"in {left}{lo:g}, {hi:g}{right}"


def _at_least(lo: float) -> tuple[Callable[[Any, TrainConfig], bool], str]:
    return (lambda v, _cfg: v >= lo), f">= {lo:g}"


def _positive() -> tuple[Callable[[Any, TrainConfig], bool], str]:
    return (lambda v, _cfg: v > 0), "> 0"


_RANGES: dict[str, tuple[Callable[[Any, TrainConfig], bool], str]] = {
    # the item bias takes one coordinate of dim
    "dim": ((lambda v, cfg: v >= (2 if cfg.uses_item_bias else 1)),
            ">= 1, and >= 2 with the item bias, which takes one coordinate"),
    "history_len": _at_least(0),
    "history_weight": _between(0, 1),
    "item_history_len": ((lambda v, cfg: v >= 0 and (v == 0 or cfg.user_id_embedding)),
                         ">= 0, and 0 without user_id_embedding (it pools user ids)"),
    "item_history_weight": _between(0, 1),
    "mlp_hidden": ((lambda v, _cfg: all(h >= 1 for h in v)), "sizes >= 1"),
    "temperature": _positive(),
    "embedding_dropout": _between(0, 1, hi_open=True),
    "id_dropout": _between(0, 1, hi_open=True),
    "logq_weight": _at_least(0),
    "extra_negatives": _at_least(0),
    "ccl_margin": _between(-1, 1),
    "ccl_negative_weight": _at_least(0),
    "margin_positive": _between(0, 2),
    "margin_negative": _between(0, 2),
    "ssl_weight": _at_least(0),
    "ssl_temperature": _positive(),
    "ssl_crop": _between(0, 1, lo_open=True),
    "ssl_mask_prob": _between(0, 1, hi_open=True),
    "lr": _positive(),
    "lr_final_ratio": _between(0, 1),
    "weight_decay": _at_least(0),
    "batch_size": _at_least(2),
    "epochs": _at_least(1),
    "seed": _between(0, 2**63 - 1),
    "eval_k": _at_least(1),
    "patience": _at_least(0),
}


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with value read as TOML (numbers, booleans, strings, arrays); a value that
    is not TOML is taken as a bare string (then checked against the key's type)."""
    if "=" not in text:
        raise RecsysError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise RecsysError(f"--set expects key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    return key.strip(), parsed
