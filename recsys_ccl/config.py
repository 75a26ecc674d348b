"""Configuration: every field declared, defaulted and checked once.

    ModelSettings   the model's hyperparameters (towers, temperature, item bias)
    TrainConfig     ModelSettings + the loss, negatives, optimiser and validation: one run
    ModelConfig     ModelSettings + what the data decides (table sizes, feature specs): what
                    a RUN's config.json and a bundle record, and what TwoTower is built from

Each rule, those spanning several fields included, is checked when a configuration is built,
so a mistake is one line that names the key, the value and what is expected, before anything
is read or written:
    training config: epochs=2.5 is not an integer
    training config: dim=0 is out of range (expected >= 1, and >= 2 with the item bias, ...)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from recsys_ccl.errors import RecsysError

__all__ = ["ModelConfig", "ModelSettings", "TrainConfig", "parse_override"]


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The two towers' hyperparameters. See recsys_ccl/model.py for what each one does."""

    dim: int = 128  # D: the length of the vectors both towers return
    # the user tower: "pool" (the id embedding and a weighted mean of the history) or
    # "transformer" (causal self-attention over the ordered history, SASRec-style)
    user_tower: Literal["pool", "transformer"] = "pool"
    # "auto": on for the pooled tower, off for the transformer (it reads the history alone)
    user_id_embedding: bool | Literal["auto"] = "auto"
    history_len: int = 50  # pool: L most recent items pooled into the user tower; 0 = off
    history_weight: float = 0.5  # g: the id embedding's share when both are on
    max_len: int = 50  # transformer: the most recent items it reads
    layers: int = 2  # transformer blocks (pre-LayerNorm self-attention + feed-forward)
    heads: int = 1  # attention heads; they divide the embedding width
    dropout: float = 0.2  # transformer: on its input, attention weights and block outputs
    # the item tower's neighbourhood: the user id embeddings of up to this many of the item's
    # training users, pooled as the user tower pools items; 0 = off
    item_history_len: int = 0
    item_history_weight: float = 0.5  # the item's own representation's share
    mlp_hidden: tuple[int, ...] = ()  # hidden sizes of an optional MLP on both towers
    normalize: bool = True  # L2-normalise both towers' outputs (cosine similarity)
    temperature: float = 0.1
    learn_temperature: bool = False
    temperature_min: float = 0.01  # a learnt temperature stays within [min, max]
    temperature_max: float = 1.0
    embedding_dropout: float = 0.0
    init_std: float = 0.1  # of every embedding table's initial rows
    # a learnt per-item logit offset, carried as one coordinate of D; "auto": on for the
    # losses on logits (infonce, bpr), off for those with margins on cosines (ccl, margin)
    item_bias: bool | Literal["auto"] = "auto"
    feature_combine: Literal["sum", "concat"] = "sum"  # id + features, or concat + linear
    # with features: drop a row's id embedding in training, so that the feature path learns
    # to stand alone (what a cold item has); no effect on a model without features
    id_dropout: float = 0.15
    # with features: leave each feature field out of a row's sum in training (no field
    # carries the row alone)
    feature_dropout: float = 0.0
    # with features: a numeric field also embeds its quantile bin (of this many, over the
    # catalogue's values), so that its effect need not be linear; 0 = the linear map alone
    # (a model's default, what bundles made before the field meant; training defaults to 10)
    numeric_bins: int = 0

    _what: ClassVar[str] = "model config"

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _conforms(hints[f.name], value):
                raise RecsysError(f"{self._what}: {f.name}={value!r} is not "
                                  f"{_describe(hints[f.name])}")
            coerced = _coerce(hints[f.name], value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Every range and cross-field rule of this class and its bases (types are checked on
        construction)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, (ok, expected) in _RULES.items():
            if key in names and not ok(getattr(self, key), self):
                value = getattr(self, key)
                raise RecsysError(f"{self._what}: {key}={value!r} is out of range (expected "
                                  f"{expected(self) if callable(expected) else expected})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise RecsysError(f"{cls._what}: unknown key {_suggest(unknown[0], names)}"
                              + (f" (also unknown: {', '.join(unknown[1:])})"
                                 if len(unknown) > 1 else ""))
        return cls(**d)

    @property
    def uses_user_ids(self) -> bool:
        """Whether the user tower has a user id embedding ("auto" resolved)."""
        if self.user_id_embedding == "auto":
            return self.user_tower == "pool"
        return bool(self.user_id_embedding)

    @property
    def sequence_length(self) -> int:
        """How many of a user's most recent items the user tower reads (0: none)."""
        return self.max_len if self.user_tower == "transformer" else self.history_len

    @property
    def model_fields(self) -> dict[str, Any]:
        """This configuration's ModelSettings fields, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ModelSettings):
    """Everything that determines a run. Defaults work on dense ratings and sparse check-ins
    alike: cosine towers, τ = 0.1, in-batch softmax with the logQ correction and hit masking,
    Adam 0.01 with a cosine decay (benchmarks/results/check_defaults.md)."""

    # content features (DATA's item_features / user_features): "auto" uses them when the DATA
    # directory has them, "none" trains the id-only model on the same data
    features: Literal["auto", "none"] = "auto"
    numeric_bins: int = 10  # (ModelSettings): a new model's numeric fields embed deciles
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
    # "bf16": the forward pass under torch.autocast on CUDA (the towers' matmuls and the fused
    # loss kernel in bfloat16, fp32 accumulation; tables and optimiser state stay fp32)
    autocast: Literal["none", "bf16"] = "none"
    # -- self-supervised view contrast of user histories (0 = off) --
    ssl_weight: float = 0.0
    ssl_temperature: float = 0.2
    ssl_crop: float = 0.8  # share of the history kept by the random crop
    ssl_mask_prob: float = 0.2  # probability of masking each remaining item
    # -- optimisation --
    optimizer: Literal["adam", "adamw"] = "adam"  # the dense weights (MLPs, encoders, τ)
    # the embedding tables (recsys_ccl/embeddings.py): updated row by row, only the rows a
    # batch touches ("dense": every row every step, as the dense optimizer does)
    table_optimizer: Literal["lazy_adam", "rowwise_adagrad", "dense"] = "lazy_adam"
    lr: float = 1e-2
    table_lr_scale: float = 1.0  # the tables' learning rate is lr x this
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr -> lr·lr_final_ratio
    lr_final_ratio: float = 0.0
    weight_decay: float = 0.0  # on the embedding tables (lazily: the rows a step touches)
    batch_size: int = 2048
    epochs: int = 20
    seed: int = 0
    # -- validation --
    eval_split: Literal["valid", "test", "none"] = "valid"
    eval_k: int = 20
    # per-epoch validation scores a seeded sample of this many users when the split has more
    # (the cost of full ranking grows with users x items); 0 = every user
    eval_sample_users: int = 50_000
    patience: int = 5  # epochs without a better valid NDCG@K before stopping; 0 = never

    _what: ClassVar[str] = "training config"

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

    @property
    def uses_item_bias(self) -> bool:
        if self.item_bias == "auto":
            return self.loss in ("infonce", "bpr")
        return bool(self.item_bias)

    def model_config(self, num_users: int, num_items: int, item_features: dict | None = None,
                     user_features: dict | None = None) -> ModelConfig:
        """The model's configuration for data of these sizes; item_features / user_features
        ({"spec", "shapes"}) are used unless features = "none"."""
        use = self.features != "none"
        # the transformer embeds a user from the ordered history alone: no user features
        users = use and self.user_tower == "pool"
        return ModelConfig(**{**self.model_fields, "item_bias": self.uses_item_bias,
                              "user_id_embedding": self.uses_user_ids},
                           num_users=num_users, num_items=num_items,
                           item_features=item_features if use else None,
                           user_features=user_features if users else None)


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelSettings):
    """A model's whole configuration: its hyperparameters and what the data decides."""

    num_users: int
    num_items: int
    # content features: {"spec": FeatureSpec dict, "shapes": {field: per-row tensor shape}};
    # the catalogue's encoded rows are buffers of the model (they travel with its weights)
    item_features: dict | None = None
    user_features: dict | None = None

    def validate(self) -> None:
        super().validate()
        for key in ("item_bias", "user_id_embedding"):  # decided by TrainConfig.model_config
            if not isinstance(getattr(self, key), bool):
                raise RecsysError(f"{self._what}: {key}={getattr(self, key)!r} is not true or "
                                  f"false (a model's configuration is decided)")

    @property
    def embedding_dim(self) -> int:
        """Width of the id embeddings: D, less the coordinate the item bias takes."""
        return self.dim - (1 if self.item_bias else 0)

    @property
    def has_features(self) -> bool:
        return self.item_features is not None or self.user_features is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return super().from_dict({**d, "mlp_hidden": tuple(d.get("mlp_hidden", ()))})


# -- type checks --

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
    if hint is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
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
    if hint is dict:
        return "a table"
    if hint is type(None):
        return "absent"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return repr(hint)


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                         f"; known keys: {', '.join(sorted(names))}")


# -- ranges and cross-field rules: key -> (check(value, config), what is expected) --

Rule = tuple[Callable[[Any, Any], bool], "str | Callable[[Any], str]"]


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v: Any, _cfg: Any) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return ok, f"in {left}{lo:g}, {hi:g}{right}"


def _at_least(lo: float) -> Rule:
    return (lambda v, _cfg: v >= lo), f">= {lo:g}"


def _positive() -> Rule:
    return (lambda v, _cfg: v > 0), "> 0"


def _bias_coordinate(cfg: Any) -> bool:
    """Whether the item bias takes one of the D coordinates."""
    if cfg.item_bias == "auto":
        return getattr(cfg, "loss", "infonce") in ("infonce", "bpr")
    return bool(cfg.item_bias)


_RULES: dict[str, Rule] = {
    # -- the model --
    "dim": ((lambda v, cfg: v >= (2 if _bias_coordinate(cfg) else 1)),
            ">= 1, and >= 2 with the item bias, which takes one coordinate"),
    "user_id_embedding": ((lambda v, cfg: not (cfg.user_tower == "transformer"
                                                and cfg.uses_user_ids)
                           and (cfg.uses_user_ids or cfg.sequence_length > 0)),
                          "true unless history_len > 0 (the pooled tower needs an id "
                          "embedding or a history); false or auto with user_tower = "
                          "'transformer' (it reads the ordered history alone)"),
    "history_len": _at_least(0),
    "max_len": _at_least(1),
    "layers": _at_least(1),
    "heads": ((lambda v, cfg: v >= 1 and (cfg.user_tower != "transformer"
                                          or (cfg.dim - _bias_coordinate(cfg)) % v == 0)),
              ">= 1, and with the transformer a divisor of the embedding width: dim, less one "
              "with the item bias"),
    "dropout": _between(0, 1, hi_open=True),
    "history_weight": _between(0, 1),
    "item_history_len": ((lambda v, cfg: v >= 0 and (v == 0 or cfg.uses_user_ids)),
                         ">= 0, and 0 without a user id embedding (it pools user ids)"),
    "item_history_weight": _between(0, 1),
    "mlp_hidden": ((lambda v, _cfg: all(h >= 1 for h in v)), "sizes >= 1"),
    "temperature_min": _positive(),
    "temperature_max": ((lambda v, cfg: v >= cfg.temperature_min), ">= temperature_min"),
    "temperature": ((lambda v, cfg: cfg.temperature_min <= v <= cfg.temperature_max),
                    lambda cfg: f"in [temperature_min, temperature_max] = "
                                f"[{cfg.temperature_min:g}, {cfg.temperature_max:g}]"),
    "embedding_dropout": _between(0, 1, hi_open=True),
    "init_std": _positive(),
    "id_dropout": _between(0, 1, hi_open=True),
    "feature_dropout": _between(0, 1, hi_open=True),
    "numeric_bins": ((lambda v, cfg: v == 0 or v >= 2), "0 (off) or >= 2"),
    "num_users": _at_least(1),
    "num_items": _at_least(1),
    # -- training --
    "logq_weight": _at_least(0),
    "extra_negatives": _at_least(0),
    "ccl_margin": _between(-1, 1),
    "ccl_negative_weight": _at_least(0),
    "margin_positive": _between(0, 2),
    "margin_negative": _between(0, 2),
    "ssl_weight": ((lambda v, cfg: v >= 0 and (v == 0 or cfg.sequence_length > 0)),
                   ">= 0, and 0 with history_len = 0 (it contrasts views of the history)"),
    "ssl_temperature": _positive(),
    "ssl_crop": _between(0, 1, lo_open=True),
    "ssl_mask_prob": _between(0, 1, hi_open=True),
    "lr": _positive(),
    "table_lr_scale": _positive(),
    "lr_final_ratio": _between(0, 1),
    "weight_decay": _at_least(0),
    "batch_size": _at_least(2),
    "epochs": _at_least(1),
    "seed": _between(0, 2**63 - 1),
    "eval_k": _at_least(1),
    "eval_sample_users": _at_least(0),
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
