"""Build a chain of anchors by stepwise distillation (docs/cbd.md, "The chain").

    teacher -> anchor 1 -> anchor 2 -> ...     each smaller than the last, each distilled from its predecessor

A chain config (YAML) names the teacher, the keys every link's distillation run shares (``distill:``, the keys of
docs/distill.md) and the anchors in order. Each link is an ordinary ``minillm-fast distill`` run (through
:func:`minillm_fast.distill.cli.distill_main`) whose student is the anchor's initialisation (its predecessor mapped
to the anchor's shape, by default) and whose teacher is the predecessor. Under ``output_dir``:

* ``links/<name>/init``: the anchor before its link (``save_pretrained``, with the predecessor's tokenizer);
* ``links/<name>/run``: the link's run directory (metrics.jsonl, checkpoints, best/, final/);
* ``anchors/<name>``: the anchor (the run's ``best/`` when it wrote one, else ``final/``), ``save_pretrained``;
* ``chain.json``: the manifest: every member (teacher, anchors, bridge anchors) with its path, shape, parameter
  count, vocabulary fingerprint, and each link's method, steps and last validation metrics. Written after each link
  (temporary file, then ``os.replace``).

A chain started again with the same config skips the links ``chain.json`` lists as finished and resumes an
interrupted link from its latest checkpoint (the link runs with ``resume: true``). Every check that needs no training
(configs, families, mappability, tokenizers, sizes, each link's distill config) runs before the first link.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .bridge import transfer_vocabulary, vocab_fingerprint
from .families import MappingError, check_mappable, shape_of
from .interpolate import param_count
from .mapping import IMPORTANCE, build_model, map_model

MANIFEST = "chain.json"
INITS = ("map", "random")
CHAIN_KEYS = ("output_dir", "teacher", "tokenizer", "method", "importance", "init", "distill", "anchors")
ANCHOR_KEYS = ("name", "config", "method", "init", "distill", "tokenizer", "bridge")
# distill keys the chain sets itself for every link
RESERVED = ("student", "teacher", "tokenizer", "output_dir", "resume", "overwrite", "method")


class ChainError(ValueError):
    """A chain config or chain folder a user can fix (the message names the key and the fix)."""


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ChainError(f"chain config {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ChainError(f"{path}: a chain config is a mapping (teacher:, distill:, anchors: [...]), got "
                         f"{type(data).__name__}")
    return data


def load_config(path_or_dir: str, what: str):
    """A Hugging Face config from a config.json or a directory holding one."""
    from transformers import AutoConfig

    p = path_or_dir
    if not os.path.exists(p):
        raise ChainError(f"{what}: {p!r} does not exist (a config.json or a save_pretrained directory)")
    try:
        if os.path.isdir(p):
            return AutoConfig.from_pretrained(p, local_files_only=True)
        with open(p) as f:
            d = json.load(f)
        mt = d.pop("model_type", None)
        if mt is None:
            raise ChainError(f"{what}: {p} has no model_type")
        return AutoConfig.for_model(mt, **d)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, ChainError):
            raise
        raise ChainError(f"{what}: cannot read a model config from {p!r}: {e}") from None


def load_tokenizer(path: str, what: str):
    from ..models import load_tokenizer as load

    try:
        return load(path)
    except ValueError as e:
        raise ChainError(f"{what}: {e}") from None


@dataclass
class Member:
    """One model of the chain as chain.json records it."""

    name: str
    role: str                      # teacher | anchor | bridge
    path: str                      # absolute while running; relative to the chain folder in chain.json
    config: Any = None
    tokenizer_path: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class Link:
    """An anchor to build: its resolved config(s), method, init and distill keys."""

    name: str
    index: int
    config: Any                    # the anchor's config
    bridge_config: Any = None      # bridge: the same with the predecessor's vocabulary
    method: str = "kd"
    init: str = "map"
    distill: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None    # a new tokenizer (bridge)
    spec: str = ""                 # hash of everything that defines the link


def _resolve_anchor_config(entry, prev_config, where: str):
    raw = entry.get("config")
    if raw is None:
        raise ChainError(f"{where}: no config: give a config.json path, a save_pretrained directory, or a mapping "
                         f"of keys to change in the predecessor's config (e.g. {{n_embd: 256, n_layer: 4}})")
    if isinstance(raw, str):
        return load_config(raw, where), False
    if not isinstance(raw, dict):
        raise ChainError(f"{where}: config must be a path or a mapping, got {type(raw).__name__}")
    if "model_type" in raw:
        from transformers import AutoConfig

        d = dict(raw)
        mt = d.pop("model_type")
        try:
            return AutoConfig.for_model(mt, **d), "vocab_size" in raw
        except ValueError as e:
            raise ChainError(f"{where}: {e}") from None
    cfg = copy.deepcopy(prev_config)
    for k, v in raw.items():
        if not hasattr(cfg, k):
            raise ChainError(f"{where}: config key {k!r} is not a key of the predecessor's "
                             f"{prev_config.model_type} config (give model_type: for another family)")
        setattr(cfg, k, v)
    if prev_config.model_type == "gpt2" and "n_inner" not in raw and "n_embd" in raw and prev_config.n_inner:
        cfg.n_inner = None   # follow the new width (4 n_embd) rather than keep the predecessor's
    if prev_config.model_type == "llama" and "hidden_size" in raw and "head_dim" not in raw:
        cfg.head_dim = prev_config.head_dim
    return cfg, "vocab_size" in raw


class Chain:
    """A chain config, checked; :meth:`run` builds the anchors (``distill_fn(argv)``: the distill entry point)."""

    def __init__(self, cfg: dict, base_dir: str = ".", log: Callable[[str], None] = print,
                 distill_fn: Optional[Callable] = None):
        self.log = log
        self.distill_fn = distill_fn
        unknown = sorted(set(cfg) - set(CHAIN_KEYS))
        if unknown:
            raise ChainError(f"unknown chain key(s) {unknown}; expected {', '.join(CHAIN_KEYS)}")
        path = lambda p: p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))  # noqa
        self.out = path(cfg.get("output_dir"))
        if not self.out:
            raise ChainError("output_dir: the chain folder is required")
        teacher = path(cfg.get("teacher"))
        if not teacher or not os.path.isdir(teacher):
            raise ChainError(f"teacher={cfg.get('teacher')!r}: give a local save_pretrained directory")
        self.method = cfg.get("method", "kd")
        self.importance = cfg.get("importance", "norm")
        if self.importance not in IMPORTANCE:
            raise ChainError(f"importance={self.importance!r}: expected one of {', '.join(IMPORTANCE)}")
        self.distill = dict(cfg.get("distill") or {})
        for k in ("train_data", "valid_data", "pt_data", "seqkd_data", "teacher_cache"):
            if isinstance(self.distill.get(k), str):
                self.distill[k] = path(self.distill[k])
        bad = sorted(set(self.distill) & set(RESERVED))
        if bad:
            raise ChainError(f"distill: {bad} are set by the chain for each link (student = the anchor's "
                             f"initialisation, teacher = its predecessor, output_dir under the chain folder); "
                             f"remove them (method: is a chain key and an anchor key)")
        tok_path = path(cfg.get("tokenizer")) or teacher
        self.teacher = Member("teacher", "teacher", teacher, load_config(teacher, "teacher"), tok_path)
        self._tokenizers = {tok_path: load_tokenizer(tok_path, "teacher tokenizer")}
        anchors = cfg.get("anchors")
        if not isinstance(anchors, list) or not anchors:
            raise ChainError("anchors: a non-empty list of anchors, each with a config (and optionally name, "
                             "method, init, distill, tokenizer, bridge)")
        self.links: list[Link] = []
        prev_cfg, prev_tok, prev_params = self.teacher.config, tok_path, param_count(self.teacher.config)
        names = {"teacher"}
        default_init = cfg.get("init", "map")
        for i, entry in enumerate(anchors):
            where = f"anchors[{i}]"
            if not isinstance(entry, dict):
                raise ChainError(f"{where}: each anchor is a mapping with at least config:")
            unknown = sorted(set(entry) - set(ANCHOR_KEYS))
            if unknown:
                raise ChainError(f"{where}: unknown key(s) {unknown}; expected {', '.join(ANCHOR_KEYS)}")
            name = str(entry.get("name") or f"anchor{i + 1}")
            if name in names or name.endswith("-bridge") or "/" in name:
                raise ChainError(f"{where}: name {name!r} is taken, reserved (-bridge) or has a '/'")
            names.add(name)
            where = f"anchor {name!r}"
            config, vocab_given = _resolve_anchor_config(entry, prev_cfg, where)
            method = entry.get("method", self.method)
            init = entry.get("init", default_init)
            if init not in INITS:
                raise ChainError(f"{where}: init={init!r}: expected one of {', '.join(INITS)}")
            d = dict(entry.get("distill") or {})
            bad = sorted(set(d) & set(RESERVED))
            if bad:
                raise ChainError(f"{where}: distill: {bad} are set by the chain; remove them")
            new_tok = path(entry.get("tokenizer"))
            bridge = bool(entry.get("bridge", False))
            link = Link(name, i, config, method=method, init=init, distill=d)
            if new_tok and new_tok != prev_tok:
                tok = self._tokenizer(new_tok, f"{where}: tokenizer")
                same = tok.get_vocab() == self._tokenizer(prev_tok, "").get_vocab()
            else:
                tok, same = None, True
            if not same and not bridge:
                raise ChainError(f"{where}: its tokenizer ({new_tok}) differs from its teacher's ({prev_tok}); "
                                 f"distillation needs one vocabulary: set bridge: true on this anchor (a bridge "
                                 f"anchor with the teacher's tokenizer is distilled first, then the vocabulary moves "
                                 f"by token strings; docs/cbd.md 'Bridge'), or use the teacher's tokenizer")
            if bridge and same:
                raise ChainError(f"{where}: bridge: true but its tokenizer is its teacher's; a bridge moves to "
                                 f"another vocabulary: give tokenizer: <path> or drop bridge")
            if bridge:
                link.tokenizer = new_tok
                if not vocab_given:
                    config.vocab_size = len(tok)
                if config.vocab_size < len(tok):
                    raise ChainError(f"{where}: vocab_size={config.vocab_size} is smaller than its tokenizer "
                                     f"({len(tok)} tokens)")
                for role in ("bos", "eos", "pad"):
                    setattr(config, f"{role}_token_id", getattr(tok, f"{role}_token_id", None))
                link.bridge_config = copy.deepcopy(config)
                link.bridge_config.vocab_size = prev_cfg.vocab_size
                for role in ("bos", "eos", "pad"):
                    setattr(link.bridge_config, f"{role}_token_id", getattr(prev_cfg, f"{role}_token_id", None))
            elif config.vocab_size != prev_cfg.vocab_size:
                raise ChainError(f"{where}: vocab_size={config.vocab_size} but its teacher's is "
                                 f"{prev_cfg.vocab_size} with the same tokenizer; keep vocab_size, or give a new "
                                 f"tokenizer: with bridge: true")
            trained = link.bridge_config or config
            if init == "map":
                try:
                    check_mappable(prev_cfg, trained, "predecessor", f"anchor {name!r}")
                except MappingError as e:
                    raise ChainError(f"{where}: init: map cannot map its predecessor to it: {e} (or use init: "
                                     f"random)") from None
            params = param_count(trained)
            if params >= prev_params:
                raise ChainError(f"{where}: {params} parameters, not fewer than its predecessor's {prev_params}; "
                                 f"each anchor of a chain is smaller than the last: order the anchors by size")
            link.spec = hashlib.sha1(json.dumps(
                {"prev": self.links[-1].spec if self.links else self.teacher.path, "config": config.to_diff_dict(),
                 "bridge": link.bridge_config.to_diff_dict() if link.bridge_config else None, "method": method,
                 "init": init, "distill": {**self.distill, **d}, "tokenizer": new_tok,
                 "importance": self.importance}, sort_keys=True, default=str).encode()).hexdigest()[:16]
            self.links.append(link)
            # the next link's predecessor: this anchor, over its own (after a bridge: the new) vocabulary
            prev_cfg, prev_params = config, param_count(config)
            if bridge:
                prev_tok = new_tok
        self._check_distill_configs()

    # ------------------------------------------------------------------------------------------------------------------
    def _tokenizer(self, path: str, what: str):
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(path, what)
        return self._tokenizers[path]

    def _link_overrides(self, link: Link, student: str, teacher: str) -> dict:
        return {**self.distill, **link.distill, "method": link.method, "student": student, "teacher": teacher,
                "output_dir": os.path.join(self.out, "links", link.name, "run"), "resume": True}

    def _check_distill_configs(self) -> None:
        """Each link's distill config through ``minillm-fast distill --dry-run`` (the teacher standing in for the
        models that do not exist yet), so a bad key stops the chain before the first link."""
        from ..cli import distill_main

        for link in self.links:
            cfg = self._link_overrides(link, self.teacher.path, self.teacher.path)
            cfg["tokenizer"] = self.teacher.tokenizer_path
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "link.yaml")
                _write_yaml(p, cfg)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        distill_main(["--config", p, "--dry-run"])
                except ValueError as e:
                    raise ChainError(f"anchor {link.name!r}: its distill config is refused: {e}") from None

    # ------------------------------------------------------------------------------------------------------------------
    def plan(self) -> list[str]:
        lines = [f"teacher: {self.teacher.path} ({param_count(self.teacher.config)} parameters)"]
        for link in self.links:
            s = shape_of(link.config, link.name)
            extra = f", bridge to {link.tokenizer}" if link.tokenizer else ""
            lines.append(f"{link.name}: {s.describe()}, {param_count(link.config)} parameters; {link.method} from "
                         f"{self.links[link.index - 1].name if link.index else 'teacher'}, init {link.init}{extra}")
        return lines

    def manifest_path(self) -> str:
        return os.path.join(self.out, MANIFEST)

    def _read_manifest(self) -> dict:
        p = self.manifest_path()
        if not os.path.exists(p):
            return {}
        with open(p) as f:
            man = json.load(f)
        done = {m["name"]: m for m in man.get("members", []) if m.get("role") == "anchor"}
        for link in self.links:
            m = done.get(link.name)
            if m is not None and m.get("link", {}).get("spec") != link.spec:
                raise ChainError(f"{p} records anchor {link.name!r} built from another config than this one "
                                 f"(teacher, sizes, method or distill keys changed); use another output_dir, or "
                                 f"remove {self.out} to rebuild the chain")
        if man.get("teacher_path") not in (None, self.teacher.path):
            raise ChainError(f"{p} belongs to a chain from teacher {man.get('teacher_path')}; use another output_dir")
        return man

    def _write_manifest(self, members: list[dict]) -> None:
        man = {"version": 1, "teacher_path": self.teacher.path, "members": members}
        os.makedirs(self.out, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".tmp-chain-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(man, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path())

    def _describe(self, name: str, role: str, path: str, tokenizer) -> dict:
        config = load_config(path, name)
        out = {"name": name, "role": role,
               "path": os.path.relpath(path, self.out) if role != "teacher" else path,
               "model_type": config.model_type, "params": param_count(config),
               "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer),
               "vocab_fingerprint": vocab_fingerprint(tokenizer)}
        try:
            out["shape"] = shape_of(config, name).to_dict()
        except MappingError:
            out["shape"] = None      # a family the maps do not know: a member, but never an init source
        return out

    # ------------------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Build every anchor not yet finished; returns the manifest."""
        man = self._read_manifest()
        members = man.get("members") or [self._describe("teacher", "teacher", self.teacher.path,
                                                        self._tokenizer(self.teacher.tokenizer_path, ""))]
        finished = {m["name"] for m in members if m["role"] == "anchor"}
        prev_path, prev_tok = self.teacher.path, self.teacher.tokenizer_path
        for link in self.links:
            anchor_dir = os.path.join(self.out, "anchors", link.name)
            if link.name in finished:
                self.log(f"anchor {link.name}: finished earlier ({anchor_dir}), skipped")
            else:
                members = [m for m in members if m["name"] not in (link.name, f"{link.name}-bridge")]
                members += self._build(link, prev_path, prev_tok, anchor_dir)
                self._write_manifest(members)
            prev_path = anchor_dir
            prev_tok = anchor_dir
        if not self.links or not os.path.exists(self.manifest_path()):
            self._write_manifest(members)
        return {"version": 1, "teacher_path": self.teacher.path, "members": members}

    def _build(self, link: Link, prev_path: str, prev_tok_path: str, anchor_dir: str) -> list[dict]:
        import torch
        from transformers import AutoModelForCausalLM

        link_dir = os.path.join(self.out, "links", link.name)
        init_dir = os.path.join(link_dir, "init")
        trained_cfg = link.bridge_config or link.config
        prev_tok = self._tokenizer(prev_tok_path, "")
        prev = AutoModelForCausalLM.from_pretrained(prev_path, local_files_only=True)
        if link.init == "map":
            res = map_model(prev, trained_cfg, self.importance, what="predecessor")
            student = build_model(trained_cfg, res.state_dict, res.sources)
            how = f"mapped from its predecessor ({'; '.join(res.notes) or 'width only'})"
        else:
            torch.manual_seed(int(self.distill.get("seed", 10)) + link.index)
            student = AutoModelForCausalLM.from_config(trained_cfg)
            how = "random (init: random)"
        del prev
        _save(student, prev_tok, init_dir)
        self.log(f"anchor {link.name}: initialised {how}; distilling ({link.method}) from {prev_path}")
        cfg = self._link_overrides(link, init_dir, prev_path)
        p = os.path.join(link_dir, "link.yaml")
        _write_yaml(p, cfg)
        rc = self._distill(["--config", p])
        if rc:
            raise ChainError(f"anchor {link.name}: its distillation run exited with {rc} (see its log above)")
        run_dir = cfg["output_dir"]
        which = "best" if os.path.isdir(os.path.join(run_dir, "best")) else "final"
        trained_dir = anchor_dir + "-bridge" if link.tokenizer else anchor_dir
        _copy_dir(os.path.join(run_dir, which), trained_dir)
        metrics = _last_eval(os.path.join(run_dir, "metrics.jsonl"))
        info = {"from": os.path.relpath(prev_path, self.out) if prev_path != self.teacher.path else "teacher",
                "method": link.method, "init": link.init, "run_dir": os.path.relpath(run_dir, self.out),
                "model": which, "steps": metrics.pop("step", None), "metrics": metrics, "spec": link.spec}
        out = []
        if link.tokenizer:
            bridge = self._describe(f"{link.name}-bridge", "bridge", trained_dir, prev_tok)
            bridge["link"] = info
            out.append(bridge)
            new_tok = self._tokenizer(link.tokenizer, "")
            model = AutoModelForCausalLM.from_pretrained(trained_dir, local_files_only=True)
            moved, stats = transfer_vocabulary(model, prev_tok, new_tok, link.config.vocab_size)
            _save(moved, new_tok, anchor_dir)
            self.log(f"anchor {link.name}: vocabulary moved to {link.tokenizer}: {stats}")
            anchor = self._describe(link.name, "anchor", anchor_dir, new_tok)
            anchor["link"] = {**info, "bridge": {"from": f"{link.name}-bridge", "tokenizer": link.tokenizer,
                                                 "rows": stats}}
        else:
            anchor = self._describe(link.name, "anchor", anchor_dir, prev_tok)
            anchor["link"] = info
        out.append(anchor)
        self.log(f"anchor {link.name}: {anchor['params']} parameters, saved to {anchor_dir}; validation {metrics}")
        return out

    def _distill(self, argv: list) -> int:
        if self.distill_fn is not None:
            return self.distill_fn(argv)
        from ..cli import distill_main

        return distill_main(argv)


def _write_yaml(path: str, data: dict) -> None:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def _save(model, tokenizer, path: str) -> None:
    from ..checkpoint import atomic_save_pretrained

    atomic_save_pretrained(model, tokenizer, path)


def _copy_dir(src: str, dst: str) -> None:
    """``dst`` becomes a copy of ``src``, all or nothing (copy beside it, then rename)."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(dst)}-")
    os.rmdir(tmp)
    shutil.copytree(src, tmp)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _last_eval(path: str) -> dict:
    """The last validation record of a run's metrics.jsonl (``eval/*`` keys and its ``step``), or {}."""
    last: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line) if line.strip() else {}
                if any(k.startswith("eval/") for k in rec):
                    last = {k: v for k, v in rec.items() if k.startswith("eval/") or k == "step"}
    last.pop("eval/best", None)
    return last


def run_chain(config_path: str, dry_run: bool = False, log: Callable[[str], None] = print,
              distill_fn: Optional[Callable] = None) -> dict:
    """Check the chain config at ``config_path`` and build its anchors (``dry_run``: check and print the plan)."""
    raw = _load_yaml(config_path)
    chain = Chain(raw, base_dir=os.path.dirname(os.path.abspath(config_path)), log=log, distill_fn=distill_fn)
    for line in chain.plan():
        log(line)
    if dry_run:
        return {}
    return chain.run()
