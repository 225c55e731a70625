"""What an experiment's YAML describes: a comparison of methods (Experiment: its models, each with its
overrides) or rounds of context extension (Rounds); read, merged with its profile and --set items, checked.
A mistake in it is a SpecError (exit status 2), a failed step an ExperimentError (exit status 1)."""
from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REFERENCE_KINDS = ("short", "long", "long_policy")
STAGE_SECONDS = {"generation": 60, "preprocessing": 90, "references": 60, "training": 150, "evaluation": 200}


class ExperimentError(Exception):
    """A step failed (exit status 1)."""


class SpecError(ExperimentError):
    """A mistake in the YAML or the arguments (exit status 2)."""


def merge(base: dict, over: dict) -> dict:
    """`over` on `base`: dictionaries merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def settings(assignments: list[str]) -> dict:
    """`--set` KEY=VALUE items (KEY dotted: pairs.documents.n=1536; VALUE read as YAML: true, 1e-5,
    null, [a, b]) as one nested dictionary to merge over the YAML."""
    out: dict = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise SpecError(f"--set {a!r}: write KEY=VALUE (KEY dotted, e.g. pairs.documents.n=1536)")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {a!r}: {part} is set to a value and used as a section")
        node[leaf] = yaml.safe_load(value)
    return out


SEED_KEYS = ("train.seed", "data.seed")  # data.seed: the sample order; train.seed: torch's (dropout, any random init)


def seed_name(name: str, seed: int) -> str:
    """A model's name at one training seed: seed 0 keeps the name, seed 2 is NAME.s2."""
    return name if seed == 0 else f"{name}.s{seed}"


def point_name(method: str, axes: dict, values) -> str:
    """A sweep point's model name, file-safe: longpo@lr2e-5+beta0.01 (each key's last part, or the whole
    key where two would read alike; characters other than letters, digits, . _ - left out)."""
    shorts = [k.rsplit(".", 1)[-1] for k in axes]
    keys = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, axes)]
    return f"{method}@" + "+".join(re.sub(r"[^A-Za-z0-9._-]", "", f"{k}{_text(v)}") for k, v in zip(keys, values))


def _settings(stamp: dict) -> dict:
    """A WORKDIR/NAME.train.json stamp's training settings (Runner.train_settings), without its checkpoint."""
    return {k: v for k, v in stamp.items() if k != "checkpoint"}


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class Model:
    name: str
    method: str | None = None  # None: untrained, only evaluated
    overrides: list[str] = field(default_factory=list)  # the method's, then the variant's or the picked ones
    reference: str = "short"
    data: str = "pairs"  # pairs | documents
    rope_theta: float | None = None  # untrained: evaluate the base at this RoPE base
    eval_lengths: list[int] = field(default_factory=list)
    group: str = ""  # its row in the table (its method or variant; every seed of it shares it); "": name
    seed: int = 0  # the training seed (SEED_KEYS)
    dev: bool = False  # evaluated on the sweep's development samples, not the test samples
    reuse: str | None = None  # seed 0 of a picked method: its sweep point, whose training it is when the settings agree

    @property
    def row(self) -> str:
        return self.group or self.name


@dataclass
class Experiment:
    spec: dict
    workdir: Path
    models: list[Model]
    root: Path  # the clone: the YAML's paths are relative to it, its commands run there
    sweep: bool = False  # the development sweep: its grid points (seed 0) and the base, on the dev samples
    picks: dict = field(default_factory=dict)  # method -> its entry of WORKDIR/results/picks.json (a plain run)

    @property
    def trained(self) -> list[Model]:
        return [m for m in self.models if m.method]

    @property
    def table_order(self) -> list[Model]:
        """The table's rows: the untrained models first, then the methods and the variants."""
        return [m for m in self.models if not m.method] + self.trained

    def groups(self) -> list[tuple[str, list[Model]]]:
        """The table's rows with their models: a method's or a variant's seeds make one row."""
        out: dict[str, list[Model]] = {}
        for m in self.table_order:
            out.setdefault(m.row, []).append(m)
        return list(out.items())

    def references(self) -> list[str]:
        """The reference sidecars the trained models read, in REFERENCE_KINDS order."""
        used = {m.reference for m in self.trained if m.data == "pairs"}
        return [k for k in REFERENCE_KINDS if k in used]

    def reference_file(self, kind: str) -> Path:
        return self.workdir / {"short": "data.ref.safetensors", "long": "data.longref.safetensors",
                               "long_policy": "data.longref_policy.safetensors"}[kind]


def read_spec(path: str | Path, profile: str | None = None, sets: list[str] | None = None) -> dict:
    """The YAML, its profile merged over it, then the --set items over both."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: not a mapping of settings")
    if profile:
        profiles = spec.get("profiles") or {}
        if profile not in profiles:
            raise SpecError(f"no profile {profile!r} in {path} (profiles: {', '.join(profiles) or 'none'})")
        spec = merge(spec, profiles[profile])
    spec.pop("profiles", None)
    return merge(spec, settings(sets or []))


def load(path: str | Path, profile: str | None = None, methods: list[str] | None = None,
         variants: list[str] | None = None, sets: list[str] | None = None, workdir: str | Path | None = None,
         sweep: bool = False, *, root: Path):
    """The Experiment (a comparison of methods; with `sweep`, its development sweep) or the Rounds
    (iterative extension) the YAML describes. A comparison's methods take the overrides the sweep
    picked (WORKDIR/results/picks.json) where it picked any. `root`: the repository clone the YAML's
    paths are relative to (tools/experiment.py passes its own)."""
    spec = read_spec(path, profile, sets)
    if "rounds" in spec:
        if methods or variants or sweep:
            raise SpecError(f"{path} runs rounds: --methods, --variants and --sweep do not apply")
        rounds = load_rounds(spec, path, root)
        if workdir:
            rounds.workdir = Path(workdir).resolve()
        return rounds
    for key in ("workdir", "model", "context", "rope_theta", "train", "methods", "evaluation"):
        if key not in spec:
            raise SpecError(f"{path}: `{key}` is missing")
    known = spec["methods"]
    chosen = methods if methods is not None else spec.get("run", list(known))
    for name in chosen:
        if name not in known:
            raise SpecError(f"unknown method {name!r} (the YAML's methods: {', '.join(known)})")
    wd = Path(workdir).resolve() if workdir else root / spec["workdir"]
    if sweep:
        if variants:
            raise SpecError("--sweep tunes the methods of `run` (or --methods); --variants do not apply")
        exp = Experiment(spec, wd, sweep_models(spec, chosen), root, sweep=True)
    else:
        picks = read_picks(wd)
        exp = Experiment(spec, wd, run_models(spec, chosen, variants or [], picks), root, picks=picks)
    names = [m.name for m in exp.models]
    if len(set(names)) != len(names):
        raise SpecError(f"a model name is used twice: {names}")
    return exp


def seeds_of(spec: dict) -> list[int]:
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                       for s in seeds) or len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds: {seeds!r}; give a list of different integers >= 0 (e.g. --set seeds=[0,1,2])")
    return seeds


def run_models(spec: dict, chosen: list[str], variants: list[str], picks: dict) -> list[Model]:
    """A plain run's models: each method (with its picked overrides) and variant once per seed, then the
    untrained base and base_rope."""
    known, ev, seeds = spec["methods"], spec["evaluation"], seeds_of(spec)
    models = []
    for name in chosen:
        pick = picks.get(name) or {}
        for s in seeds:
            m = _trained(seed_name(name, s), name, known[name], pick.get("overrides", []), ev["lengths"])
            m.group, m.seed, m.reuse = name, s, pick.get("pick") if s == 0 else None
            models.append(m)
    models += [Model("base", eval_lengths=list(ev["lengths"])),
               Model("base_rope", rope_theta=float(spec["rope_theta"]), eval_lengths=list(ev["lengths"]))]
    all_variants = spec.get("variants") or {}
    for name in (list(all_variants) if variants == ["all"] else variants):
        if name not in all_variants:
            raise SpecError(f"unknown variant {name!r} (the YAML's variants: {', '.join(all_variants) or 'none'})")
        v = all_variants[name]
        if v.get("method") not in known:
            raise SpecError(f"variant {name}: unknown method {v.get('method')!r}")
        for s in seeds:
            m = _trained(seed_name(name, s), v["method"], known[v["method"]], v.get("overrides", []),
                         v.get("eval_lengths", ev["lengths"]))
            m.group, m.seed = name, s
            models.append(m)
    return models


def sweep_spec(spec: dict) -> dict:
    """The YAML's `sweep`, checked: grid and per_method map dotted config keys to lists of values."""
    sw = spec.get("sweep")
    if not isinstance(sw, dict) or not (sw.get("grid") or sw.get("per_method")):
        raise SpecError("--sweep: the YAML has no `sweep.grid` (e.g. sweep: {grid: {optim.lr: [5e-6, 1e-5]}, "
                        "dev: {seed: 1, min_samples: 130, lengths: [16384]}})")
    axes = [("sweep.grid", sw.get("grid") or {})] + [(f"sweep.per_method.{k}", v or {})
                                                      for k, v in (sw.get("per_method") or {}).items()]
    for where, grid in axes:
        if not isinstance(grid, dict):
            raise SpecError(f"{where}: a mapping of config keys to lists of values (optim.lr: [5e-6, 1e-5])")
        for k, v in grid.items():
            if "." not in str(k) or not isinstance(v, list) or not v:
                raise SpecError(f"{where}.{k}: give a dotted config key and a list of values (optim.lr: [5e-6, 1e-5])")
    dev = sw.get("dev") or {}
    if "lengths" not in dev:
        raise SpecError("sweep.dev.lengths: the development samples' lengths are missing (e.g. [16384])")
    if int(dev.get("seed", 1)) == 0:
        raise SpecError("sweep.dev.seed: 0 draws the test samples; give another seed (e.g. 1)")
    return sw


def sweep_models(spec: dict, chosen: list[str]) -> list[Model]:
    """The sweep's models: every point of each method's grid (sweep.grid, with sweep.per_method's keys
    for that method over it), at seed 0, then the untrained base; all evaluated on the dev samples."""
    sw = sweep_spec(spec)
    lengths = list(sw["dev"]["lengths"])
    models = []
    for method in chosen:
        axes = {**(sw.get("grid") or {}), **((sw.get("per_method") or {}).get(method) or {})}
        for values in itertools.product(*axes.values()):
            extra = [f"{k}={_text(v)}" for k, v in zip(axes, values)]
            m = _trained(point_name(method, axes, values), method, spec["methods"][method], extra, lengths)
            m.group, m.dev = m.name, True
            models.append(m)
    return models + [Model("base", eval_lengths=lengths, dev=True)]


def picks_file(workdir: Path) -> Path:
    return workdir / "results" / "picks.json"


def read_picks(workdir: Path) -> dict:
    """method -> {pick, overrides, ...} from WORKDIR/results/picks.json ({} without one)."""
    f = picks_file(workdir)
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())["methods"]
    except (ValueError, KeyError) as e:
        raise SpecError(f"{f}: not a picks file ({e}); rerun --sweep, or remove it to train with the YAML's overrides") from None


def _trained(name, method, entry, extra, lengths) -> Model:
    entry = entry or {}
    ref, data = entry.get("reference", "short"), entry.get("data", "pairs")
    if ref not in REFERENCE_KINDS or data not in ("pairs", "documents"):
        raise SpecError(f"method {method}: reference is one of {REFERENCE_KINDS}, data pairs or documents")
    return Model(name, method, list(entry.get("overrides", [])) + list(extra), ref, data, None, list(lengths))


def eval_tasks(spec: dict) -> list[str]:
    """The tasks tools/eval_long.py runs: evaluation.tasks, else every task of the suite its args name
    (RULER's 13 by default; `--suite smoke`: the 7 smoke tasks)."""
    ev = spec["evaluation"]
    if ev.get("tasks"):
        return list(ev["tasks"])
    args = [str(a) for a in ev.get("args") or []]
    suite = next((b for a, b in zip(args, args[1:]) if a == "--suite"), None) or \
        next((a.split("=", 1)[1] for a in args if a.startswith("--suite=")), "ruler")
    if suite == "smoke":
        from megatron_longpo.eval.ruler import DEFAULT_TASKS

        return list(DEFAULT_TASKS)
    from megatron_longpo.eval.ruler_tasks import RULER_TASKS

    return list(RULER_TASKS)


def samples_per_task(spec: dict, dev: bool = False) -> int:
    """tools/eval_long.py --samples: `samples`, else ceil(min_samples / the suite's tasks), per length."""
    ev = ((spec.get("sweep") or {}).get("dev") or {}) if dev else spec["evaluation"]
    if ev.get("samples"):
        return int(ev["samples"])
    return math.ceil(int(ev.get("min_samples", 50)) / len(eval_tasks(spec)))


# ---- rounds: LongPO's iterative context extension (examples/longpo_iterative/experiment.yaml)

@dataclass
class Round:
    index: int  # 1, 2, ...
    length: int  # L_r: the pairs' limit and the policy's max_position_embeddings
    config: str  # the round's training recipe
    rope_theta: float | None  # the policy's RoPE base; None: the generator's own x rope_factor
    chunk_tokens: int  # the short contexts' largest chunk


@dataclass
class Rounds:
    spec: dict
    workdir: Path
    rounds: list[Round]
    root: Path  # the clone: the rounds' recipes are relative to it, their commands run there


def load_rounds(spec: dict, path, root: Path) -> Rounds:
    for key in ("workdir", "model", "rounds", "documents", "pairs"):
        if key not in spec:
            raise SpecError(f"{path}: `{key}` is missing")
    if not isinstance(spec["rounds"], list) or not spec["rounds"]:
        raise SpecError(f"{path}: `rounds` is a list of rounds ({{length: TOKENS, config: RECIPE.yaml}}, ...)")
    rounds = []
    for i, r in enumerate(spec["rounds"], 1):
        if not isinstance(r, dict) or "length" not in r or "config" not in r:
            raise SpecError(f"{path}: round {i} needs `length` and `config`")
        if not (root / r["config"]).is_file():
            raise SpecError(f"{path}: round {i}: no recipe {r['config']}")
        length = int(r["length"])
        theta = r.get("rope_theta")
        rounds.append(Round(i, length, r["config"], float(theta) if theta is not None else None,
                            int(r.get("chunk_tokens") or length // 4)))
    docs = spec["documents"] or {}
    if not docs.get("path") and not {"n", "words_per_token"} <= set(docs):
        raise SpecError(f"{path}: `documents` needs `path` (your corpus) or `n` and `words_per_token`")
    return Rounds(spec, root / spec["workdir"], rounds, root)
