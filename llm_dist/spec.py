"""The job spec: typed sections, YAML loading, `--set` overrides and errors that name the field."""

import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from llm_dist.base import Place, Section, UserError
from llm_dist.cluster import ClusterConfig
from llm_dist.data.config import DataConfig
from llm_dist.model import ModelConfig
from llm_dist.serve.config import ServeConfig, positions_of, vllm_context_problem
from llm_dist.tracking.config import TrackingConfig
from llm_dist.train.config import PretrainConfig
from llm_dist.tune.config import TuneConfig

STAGES = ("data", "pretrain", "tune", "serve")


class JobSpec(Section):
    """One run: a name, where its outputs go, the stages to run, and a section per stage."""

    name: str | None = None
    """Run name: the run's folder under storage_path (letters, digits, `.`, `_`, `-`); empty: `run-<your user name>`, so that two people who share a storage_path do not share a run by accident."""
    storage_path: Place = "./runs"
    """Where runs live: a local folder, or s3://bucket/prefix or gs://bucket/prefix."""
    stages: list[Literal["data", "pretrain", "tune", "serve"]] = Field(
        default_factory=lambda: list(STAGES)
    )
    """Stages `llm-dist run` runs, in pipeline order."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Corpus reading, cleaning, tokenizer and packing."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The causal LM."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """DeepSpeed ZeRO pretraining under Ray Train."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """The Ray Tune fine-tuning sweep."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """The Ray Serve deployment."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Ray address and per-worker resources."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking of the run, its stages and trials, and the registered winner."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str:
        if v is None:
            v = default_name()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(
                f"name: {v!r} is not a folder name; use letters, digits, '.', '_' or '-'"
            )
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "file", "s3", "gs"):
            raise ValueError(
                f"storage_path: scheme {scheme}:// is not supported; use a local folder, "
                "s3://bucket/prefix or gs://bucket/prefix"
            )
        return v

    @model_validator(mode="after")
    def _cross(self):
        problems = []
        if len(set(self.stages)) != len(self.stages) or self.stages != sorted(
            self.stages, key=STAGES.index
        ):
            problems.append(
                f"stages: {self.stages} must list each stage once, in the order {list(STAGES)}"
            )
        if {"data", "pretrain"} & set(self.stages) and not self.data.sources:
            problems.append("data.sources: empty; name at least one corpus file, folder or glob")
        if "tune" in self.stages:
            if not self.tune.search_space:
                problems.append(
                    "tune.search_space: empty; give at least one setting to vary, "
                    "or leave tune out of stages"
                )
            if not self.tune.task.sources:
                problems.append(
                    "tune.task.sources: empty; name the task's data, or leave tune out of stages"
                )
        if self.pretrain.precision == "fp16" and self.cluster.use_gpu is False:
            problems.append(
                "pretrain.precision: fp16 needs GPUs (cluster.use_gpu is false); use bf16 or fp32"
            )
        if self.cluster.accelerator_type and self.cluster.use_gpu is False:
            problems.append(
                "cluster.accelerator_type: set while cluster.use_gpu is false; "
                "remove it or set use_gpu: auto"
            )
        problems += _model_problems(self)
        problems += filter(None, [vllm_context_problem(self.serve, *_served_positions(self))])
        if problems:
            raise ValueError("\n".join(problems))
        return self


def default_name() -> str:
    """`run-<user name>`, the name a spec without one runs under (the user's login, made a
    folder name; `run` where the system knows no user)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = ""
    user = re.sub(r"[^A-Za-z0-9._-]", "_", user)[:90]
    return f"run-{user}" if user else "run"


def _served_positions(spec: JobSpec) -> tuple[int | None, str]:
    """The positions of the model the serve stage will host, where the spec tells them."""
    if "serve" not in spec.stages or spec.serve.engine != "vllm":
        return None, ""
    if spec.serve.model:
        return positions_of(spec.serve.model), f"serve.model {spec.serve.model}"
    if "tune" in spec.stages and spec.tune.base_model:
        return positions_of(spec.tune.base_model), f"tune.base_model {spec.tune.base_model}"
    if {"pretrain", "tune"} & set(spec.stages):  # the winner keeps its base's positions
        config = spec.model.hf_config() or {}
        return config.get("max_position_embeddings"), "the model pretrained here (model:)"
    return None, ""


def _model_problems(spec: JobSpec) -> list[str]:
    """Checks transformers would otherwise make at model build time, long after submission."""
    cfg = spec.model.hf_config()
    if cfg is None:
        return []
    problems = []
    positions = cfg.get("max_position_embeddings")
    if positions is not None and spec.data.seq_len > positions:
        problems.append(
            f"data.seq_len: {spec.data.seq_len} exceeds the model's max_position_embeddings "
            f"({positions}); lower seq_len or set model.overrides: {{max_position_embeddings: "
            f"{spec.data.seq_len}}}"
        )
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", heads)
    if hidden and heads and hidden % heads:
        problems.append(
            f"model.overrides: hidden_size {hidden} is not divisible by num_attention_heads "
            f"{heads}; pick sizes that divide"
        )
    if heads and kv_heads and heads % kv_heads:
        problems.append(
            f"model.overrides: num_attention_heads {heads} is not divisible by "
            f"num_key_value_heads {kv_heads}; pick sizes that divide"
        )
    return problems  # tune's methods are checked against the base model itself (check_base)


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML spec (`-`: standard input), apply `dotted.key=value` overrides, validate.

    Every problem comes in one UserError.
    """
    path = Path(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except FileNotFoundError:
        raise UserError(f"spec file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        reason = getattr(e, "problem", None) or str(e)
        raise UserError(f"{path}: malformed YAML{at}: {reason}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}"
        )
    problems = [p for item in overrides if (p := _apply_override(raw, item))]
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems += [line for err in e.errors() for line in _describe(err)]
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"{path}: {len(problems)} problem(s) in the job spec:\n{listing}")
    return spec


def _apply_override(raw: dict, item: str) -> str | None:
    """Set `dotted.key=value` in the raw spec, typed by the field it names; a problem or None."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"--set {item!r}: expected dotted.key=value, e.g. pretrain.zero_stage=3"
    parts = key.split(".")
    annotation: Any = JobSpec
    for depth, part in enumerate(parts):
        model = _model_of(annotation)
        if model is None:  # inside a free-form mapping: any key goes
            annotation = Any
            continue
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the spec"
            return f"--set {key}: {_unknown(part, model, where)}"
        annotation = model.model_fields[part].annotation
    if _model_of(annotation) is not None:
        first = next(iter(_model_of(annotation).model_fields))
        return f"--set {key}: is a section; set one of its keys, e.g. {key}.{first}=..."
    if _is_text(annotation) and value not in ("null", "~"):
        parsed = value  # keep "007" or "1e3" as text where the field is text
    else:
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            return f"--set {key}: value {value!r} is not valid YAML ({getattr(e, 'problem', e)})"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping in the spec"
    node[parts[-1]] = parsed
    return None


def _describe(err: dict) -> list[str]:
    """One pydantic error as lines that each start with the field path."""
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "spec"
    if err["type"] == "value_error":  # our validators name fields (a field's own: its path)
        lines = str(err["ctx"]["error"]).splitlines()
        return (
            lines if not loc or lines[0].startswith(loc[0]) else [f"{path}: {lines[0]}", *lines[1:]]
        )
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] | None = JobSpec
        for part in loc[:-1]:
            field = model.model_fields.get(part) if model else None
            model = _model_of(field.annotation) if field else None
        return [f"{path}: {_unknown(loc[-1], model, '.'.join(loc[:-1]) or 'the spec')}"]
    if err["type"] == "missing":
        return [f"{path}: required; add it"]
    return [f"{path}: got {err['input']!r}; {err['msg']}"]


def _unknown(key: str, model: type[BaseModel] | None, where: str) -> str:
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(key, known, n=1) or [k for k in known if key in k][:1]
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} in {where}; {hint}known keys: {', '.join(known)}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind an annotation such as `X` or `X | None`, else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return is_union and set(typing.get_args(annotation)) == {str, type(None)}


def reference() -> str:
    """The field reference of every section as Markdown (docs/spec.md embeds it; a test keeps it in step)."""
    out = []

    def table(model: type[BaseModel], prefix: str) -> None:
        rows, nested = [], []
        for name, field in model.model_fields.items():
            sub = _model_of(field.annotation)
            if sub is not None:
                nested.append((sub, f"{prefix}{name}."))
                continue
            default = field.get_default(call_default_factory=True)
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
            rows.append(
                f"| `{prefix}{name}` | {_type_name(field.annotation)} | `{shown}` | "
                f"{(field.description or '').replace('|', '/')} |"
            )
        if rows:
            out.append(f"\n**{prefix.rstrip('.') or 'top level'}** — {model.__doc__}\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|")
            out.extend(rows)
        for sub, sub_prefix in nested:
            table(sub, sub_prefix)

    table(JobSpec, "")
    return "\n".join(out).strip() + "\n"


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # a type with a validator (`base.Place`): its base type
        return _type_name(args[0])
    if origin is Literal:
        return " / ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " / ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation)).replace("Any", "any")


if __name__ == "__main__":
    print(reference(), end="")
