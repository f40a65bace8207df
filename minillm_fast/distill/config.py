"""The distillation config: one dataclass, read from YAML, overridden by ``key=value`` pairs, checked before any work.

This module validates everything that can be checked without loading a model or reading the data: values, choices,
batch arithmetic, paths, the consistency of related keys (``select_metric`` with ``eval_generate``, the keys a
method needs), the ``okd_*`` keys and the ``peft`` install of method=okd, and an ``output_dir`` that holds an earlier
run. ``--dry-run`` runs exactly these checks; the trainer adds only those that need the models or the data. Each
field carries its one line of help as ``metadata["help"]`` (``--help-config`` prints :func:`help_text`).

Defaults follow the MiniLLM reference implementation (microsoft/LMOps, folder minillm; docs/design.md section 3). Keys
whose reference value differs between MiniLLM and the baselines (learning rate, schedule, warm-up, weight decay,
batch size, dropout, evaluation interval) default to ``null`` and are resolved per ``method`` by :meth:`resolve`;
the resolved values are what the run directory's ``config.yaml`` records.

    cfg = DistillConfig.from_sources("run.yaml", ["lr=1e-5", "alpha=0"])   # file, then overrides
    cfg = cfg.resolve(world_size=1)                                        # method defaults + validation
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from . import checkpoint as ckpt

METHODS = ("sft", "kd", "seqkd", "minillm", "okd")     # the trainer's registry holds one implementation of each
DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
SCHEDULES = ("constant", "cosine", "linear")
ADVANTAGES = ("reference", "paper")
SELECT_METRICS = ("rougeL", "loss", "none")
SEQKD_OBJECTIVES = ("kd", "sft")
BACKENDS = ("auto", "triton", "native", "torch")
PARALLEL = ("ddp", "fsdp")
OKD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
OKD_INSTALL = "pip install 'minillm-fast[okd]'"
CACHE_TAILS = ("bucket", "renorm", "ignore")

# Per-method defaults of the keys left null (reference scripts: gpt2/minillm/train_*.sh for minillm,
# gpt2/{sft,kd,seqkd}/*_base.sh for the baselines; the paper's appendix B.1).
METHOD_DEFAULTS = {
    "minillm": dict(lr=5e-6, lr_schedule="constant", warmup_steps=100, weight_decay=1e-6, batch_size=64,
                    disable_dropout=True, eval_interval=100, select_metric="rougeL"),
    "baseline": dict(lr=5e-4, lr_schedule="cosine", warmup_steps=0, weight_decay=1e-2, batch_size=32,
                     disable_dropout=False, eval_interval=None, select_metric="rougeL"),
}


class ConfigError(ValueError):
    """A config value a user can fix: the message names the key, the value and what is expected."""


def _field(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config field and its one line of help (``--help-config`` prints it; docs/distill.md explains it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DistillConfig:
    """Every key of a run. A ``null`` default is resolved per ``method`` by :meth:`resolve` (see ``METHOD_DEFAULTS``);
    each field's ``metadata["help"]`` is its line in ``--help-config``."""

    # --- what to run ---------------------------------------------------------------------------------------------
    method: str = _field("minillm", "sft | kd | seqkd | minillm | okd")
    student: Optional[str] = _field(None, "local path of the student (save_pretrained directory)")
    teacher: Optional[str] = _field(None, "local path of the teacher (kd, seqkd, minillm, okd; else for validation)")
    tokenizer: Optional[str] = _field(None, "local path of the tokenizer (default: the student's)")
    train_data: Optional[str] = _field(None, "JSONL: instruction, [context|input], response")
    valid_data: Optional[str] = _field(None, "JSONL, same fields; response may be a list (references)")
    pt_data: Optional[str] = _field(None, "plain-text corpus (.txt, blank-line separated, or .jsonl \"text\")")
    output_dir: Optional[str] = _field(None, "the run directory")
    seed: int = _field(10, "every order, sample and initialisation derives from it")
    device: str = _field("auto", "auto | cpu | cuda")
    dtype: str = _field("fp32", "fp32 | bf16 compute (bf16: autocast, fp32 master weights)")
    teacher_dtype: Optional[str] = _field(None, "fp32 | bf16 (default: dtype)")
    attn_implementation: str = _field("auto", "auto (transformers chooses what the model supports) | sdpa | eager | "
                                           "flash_attention_2")
    backend: str = _field("auto", "auto | triton | native | torch: backend of the fused ops (MINILLM_FAST_BACKEND "
                               "also applies)")
    parallel: str = _field("ddp", "ddp | fsdp: how torchrun ranks share the models (fsdp: sharded)")
    # --- data ----------------------------------------------------------------------------------------------------
    max_length: int = _field(512, "prompt + response tokens")
    max_prompt_length: int = _field(256, "longer prompts are dropped")
    max_train_samples: Optional[int] = _field(None, "use at most this many training examples (null: all)")
    max_valid_samples: Optional[int] = _field(1000, "use at most this many validation examples (the reference's "
                                                 "dev-num)")
    # --- optimisation --------------------------------------------------------------------------------------------
    lr: Optional[float] = _field(None, "learning rate: minillm 5e-6; baselines 5e-4")
    lr_min: Optional[float] = _field(None, "floor of cosine/linear decay (default 1e-7, the reference's lr-min)")
    lr_schedule: Optional[str] = _field(None, "constant | cosine | linear after the warm-up: minillm constant; "
                                           "baselines cosine")
    warmup_steps: Optional[int] = _field(None, "linear warm-up steps: minillm 100; baselines 0")
    weight_decay: Optional[float] = _field(None, "AdamW weight decay, matrices only: minillm 1e-6; baselines 1e-2")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.95, "AdamW beta2")
    adam_eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "max global grad norm; 0 disables")
    batch_size: Optional[int] = _field(None, "global sequences per optimiser step: minillm 64; baselines 32")
    micro_batch_size: Optional[int] = _field(None, "per rank per forward (default batch_size / world size)")
    epochs: int = _field(20, "baselines: passes over the training set")
    total_iters: Optional[int] = _field(None, "optimiser steps: minillm 5000; baselines epochs x steps/epoch")
    disable_dropout: Optional[bool] = _field(None, "minillm true (reference: dropout off); baselines false")
    # --- KD / SeqKD ----------------------------------------------------------------------------------------------
    kd_ratio: float = _field(0.5, "loss = (1 - kd_ratio) CE + kd_ratio KL(teacher || student); also MiniLLM's PT term")
    seqkd_data: Optional[str] = _field(None, "teacher responses (JSONL) to reuse; null = generate them first")
    seqkd_objective: str = _field("kd", "kd | sft: objective on the teacher-generated responses")
    teacher_cache: Optional[str] = _field(None, "a minillm-fast teacher-cache folder: kd (and seqkd's kd objective, "
                                                "with seqkd_data) distil from its top k, never loading the teacher")
    teacher_cache_tail: str = _field("bucket", "bucket | renorm | ignore: the rest of the mass outside the cached "
                                               "top k (sparse_divergence's tail)")
    # --- MiniLLM -------------------------------------------------------------------------------------------------
    num_rollouts: int = _field(256, "global rollouts per collection")
    rollout_batch_size: int = _field(16, "prompts per generation call (the reference's chunk-size)")
    ppo_epochs: int = _field(4, "inner epochs over each rollout buffer")
    alpha: float = _field(0.2, "teacher mix-in of the sampling distribution; 0 = student only")
    gamma: float = _field(0.95, "discount of the rewards")
    cliprange: float = _field(0.2, "PPO ratio clip")
    reward_scaling: Optional[float] = _field(0.5, "rewards are divided by it (null: not scaled)")
    cliprange_reward: Optional[float] = _field(100.0, "rewards clipped to +-this (null: not clipped)")
    length_norm: bool = _field(True, "divide the return by the number of remaining tokens")
    advantage: str = _field("reference", "reference: sum_{t'>=t} / N_t | paper: R_{t+1} / (tokens after t)")
    whiten_advantages: bool = _field(True, "whiten advantages over the valid tokens of the global mini-batch")
    single_step: bool = _field(True, "add the full-vocabulary reverse KL term")
    single_step_weighted: bool = _field(False, "weight it by w_t (paper Eq. 5; the reference does not)")
    lm_coef: float = _field(1.0, "weight of the pre-training term (needs pt_data; 0 = off)")
    pt_batch_size: Optional[int] = _field(None, "global PT sequences per step (default batch_size)")
    temperature: float = _field(1.0, "sampling temperature of rollouts and validation samples")
    top_k: int = _field(0, "rollouts sample the full distribution: only 0 is supported")
    top_p: float = _field(1.0, "only 1.0 is supported")
    max_new_tokens: Optional[int] = _field(None, "response tokens per rollout (default max_length - "
                                              "max_prompt_length)")
    cache_teacher_hidden: bool = _field(True, "keep the teacher's rollout hidden states for the single-step term")
    # --- OKD (online KD: a LoRA module on the teacher, trained with the student; distill/methods/okd.py) -------------
    okd_alpha: float = _field(0.5, "teacher loss a KL + (1 - a) CE(labels) (the paper's alpha, Eq. 16)")
    okd_divergence: str = _field("forward_kl", "student loss (Eq. 17): forward_kl KL(p||q) | reverse_kl KL(q||p) | jsd")
    okd_teacher_divergence: str = _field("reverse_kl", "teacher's KL term (Eq. 16): reverse_kl KL(q||p) | forward_kl | "
                                                    "jsd")
    okd_jsd_beta: float = _field(0.5, "teacher weight in the JSD mixture (when either divergence is jsd)")
    okd_lora_rank: int = _field(32, "LoRA rank r of the teacher's online module")
    okd_lora_alpha: Optional[float] = _field(None, "LoRA alpha; scaling s = alpha / r (default 2 r: s = 2)")
    okd_lora_dropout: float = _field(0.0, "dropout on the LoRA input (the teacher itself stays in eval mode)")
    okd_target_modules: Optional[list] = _field(None, "modules to adapt (null: the attention query/value projections: "
                                                   "q_proj/v_proj, c_attn, ...)")
    okd_lr: Optional[float] = _field(None, "the LoRA module's lr (default lr; same schedule)")
    # --- evaluation ----------------------------------------------------------------------------------------------
    eval_interval: Optional[int] = _field(None, "optimiser steps between evaluations (minillm 100; baselines 1 epoch)")
    eval_on_start: bool = _field(False, "evaluate the initial student before the first step (a step-0 metrics line; "
                                        "never a candidate for best/)")
    eval_generate: bool = _field(True, "sample responses for Rouge-L / exact match / reverse KL")
    eval_batch_size: int = _field(32, "prompts per validation batch")
    eval_max_new_tokens: Optional[int] = _field(None, "response tokens of validation samples (default max_new_tokens)")
    select_metric: Optional[str] = _field(None, "rougeL | loss | none: which validation number picks best/ (default "
                                             "rougeL, which needs eval_generate)")
    final_eval: bool = _field(True, "evaluate best/ (or final/) over eval_seeds at the end")
    eval_seeds: list = _field(help="seeds of the final evaluation", factory=lambda: [10, 20, 30, 40, 50])
    no_repeat_ngram_size: int = _field(6, "final evaluation only (model.generate)")
    # --- run -----------------------------------------------------------------------------------------------------
    log_interval: int = _field(1, "optimiser steps between metrics lines")
    max_bad_steps: int = _field(5, "optimiser steps in a row with a non-finite gradient norm (each skipped: the "
                                   "weights never see it) before the run stops")
    preempt_timeout: float = _field(60.0, "seconds after SIGTERM/SIGINT for the step in progress to finish and a "
                                          "checkpoint to be written; past it the process exits without one")
    save_interval: int = _field(500, "optimiser steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _field(2, "newest checkpoints kept")
    resume: Any = _field(False, "false | true (latest checkpoint in output_dir) | a checkpoint path")
    overwrite: bool = _field(False, "start afresh in an output_dir that holds an earlier run's checkpoints")
    progress_bar: bool = _field(True, "a tqdm bar on rank 0")
    plots: bool = _field(True, "write plots/*.png from metrics.jsonl at the end")

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "DistillConfig":
        cfg = cls()
        cfg.update(values, source=source)
        return cfg

    @classmethod
    def from_sources(cls, path: Optional[str] = None, overrides: Sequence[str] = ()) -> "DistillConfig":
        """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (values parsed as YAML)."""
        cfg = cls()
        if path is not None:
            cfg.update(load_yaml(path), source=path)
        cfg.update(parse_overrides(overrides), source="command line")
        return cfg

    def update(self, values: dict, *, source: str = "config") -> None:
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
        known = self.keys()
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help-config for the list"
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
            setattr(self, key, _coerce(key, value, _FLOAT_KEYS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------------------
    def resolve(self, world_size: int = 1, *, check_paths: bool = True) -> "DistillConfig":
        """A copy with the per-method defaults filled in, checked (raises :class:`ConfigError`)."""
        cfg = dataclasses.replace(self)
        cfg.eval_seeds = list(self.eval_seeds) if isinstance(self.eval_seeds, (list, tuple)) else self.eval_seeds
        _choice("method", cfg.method, METHODS)
        defaults = METHOD_DEFAULTS["minillm" if cfg.method == "minillm" else "baseline"]
        for key, value in defaults.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.lr_min is None:
            cfg.lr_min = 1e-7
        if cfg.teacher_dtype is None:
            cfg.teacher_dtype = cfg.dtype
        if cfg.tokenizer is None:
            cfg.tokenizer = cfg.student
        if cfg.max_new_tokens is None:
            cfg.max_new_tokens = cfg.max_length - cfg.max_prompt_length
        if cfg.eval_max_new_tokens is None:
            cfg.eval_max_new_tokens = cfg.max_new_tokens
        if cfg.pt_batch_size is None:
            cfg.pt_batch_size = cfg.batch_size
        if cfg.method == "okd":
            cfg._resolve_okd()          # okd_* defaults and checks; peft must be installed
        cfg._check(world_size, check_paths)
        if cfg.micro_batch_size is None:
            cfg.micro_batch_size = cfg.batch_size // world_size
        return cfg

    def _resolve_okd(self) -> None:
        """method=okd: fill the ``okd_*`` defaults (in place) and check them; peft must be importable."""
        _choice("okd_divergence", self.okd_divergence, OKD_DIVERGENCES)
        _choice("okd_teacher_divergence", self.okd_teacher_divergence, OKD_DIVERGENCES)
        _number("okd_alpha", self.okd_alpha, low=0.0, high=1.0)
        _number("okd_jsd_beta", self.okd_jsd_beta, low=0.0, high=1.0)
        _int("okd_lora_rank", self.okd_lora_rank, minimum=1)
        if self.okd_lora_alpha is None:
            self.okd_lora_alpha = 2.0 * self.okd_lora_rank
        _number("okd_lora_alpha", self.okd_lora_alpha, low=0.0, low_open=True)
        _number("okd_lora_dropout", self.okd_lora_dropout, low=0.0)
        if self.okd_lora_dropout >= 1.0:
            raise ConfigError(f"okd_lora_dropout={self.okd_lora_dropout!r} must be < 1")
        if self.okd_lr is None:
            self.okd_lr = self.lr
        _number("okd_lr", self.okd_lr, low=0.0, low_open=True)
        targets = self.okd_target_modules
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None and (not isinstance(targets, (list, tuple)) or not targets
                                    or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"okd_target_modules={self.okd_target_modules!r} must be null (the attention query and "
                              f"value projections) or a list of module names, e.g. [q_proj, v_proj]")
        self.okd_target_modules = None if targets is None else list(targets)
        if self.parallel != "ddp":
            raise ConfigError(f"method='okd' runs with parallel=ddp only (the teacher's LoRA module is trained and "
                              f"its gradients are all-reduced as a replicated module); got parallel={self.parallel!r}")
        require_peft()

    def _check(self, world_size: int, check_paths: bool) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("teacher_dtype", self.teacher_dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("backend", self.backend, BACKENDS)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("advantage", self.advantage, ADVANTAGES)
        _choice("select_metric", self.select_metric, SELECT_METRICS)
        _choice("seqkd_objective", self.seqkd_objective, SEQKD_OBJECTIVES)
        _choice("teacher_cache_tail", self.teacher_cache_tail, CACHE_TAILS)
        if self.teacher_cache is not None:
            self._check_teacher_cache(check_paths)
        for key in ("seed",):
            _int(key, getattr(self, key), minimum=0)
        for key in ("max_length", "max_prompt_length", "batch_size", "epochs", "num_rollouts", "rollout_batch_size",
                    "ppo_epochs", "pt_batch_size", "max_new_tokens", "eval_batch_size", "eval_max_new_tokens",
                    "log_interval", "keep_checkpoints", "max_bad_steps"):
            _int(key, getattr(self, key), minimum=1)
        for key in ("warmup_steps", "save_interval", "no_repeat_ngram_size", "top_k"):
            _int(key, getattr(self, key), minimum=0)
        for key in ("total_iters", "micro_batch_size", "max_train_samples", "max_valid_samples", "eval_interval"):
            if getattr(self, key) is not None:
                _int(key, getattr(self, key), minimum=1)
        for key in ("lr", "temperature", "adam_eps", "preempt_timeout"):
            _number(key, getattr(self, key), low=0.0, low_open=True)
        for key in ("lr_min", "weight_decay", "grad_clip", "lm_coef"):
            _number(key, getattr(self, key), low=0.0)
        for key in ("adam_beta1", "adam_beta2", "gamma", "alpha", "kd_ratio"):
            _number(key, getattr(self, key), low=0.0, high=1.0)
        _number("cliprange", self.cliprange, low=0.0, low_open=True)
        for key in ("reward_scaling", "cliprange_reward"):
            if getattr(self, key) is not None:
                _number(key, getattr(self, key), low=0.0, low_open=True)
        _number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        for key in ("length_norm", "whiten_advantages", "single_step", "single_step_weighted", "cache_teacher_hidden",
                    "eval_generate", "eval_on_start", "final_eval", "progress_bar", "plots", "disable_dropout", "overwrite"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be true or false")
        if not isinstance(self.resume, (bool, str)):
            raise ConfigError(f"resume={self.resume!r} must be false, true (latest checkpoint) or a checkpoint path")
        if (not isinstance(self.eval_seeds, list) or not self.eval_seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.eval_seeds)):
            raise ConfigError(f"eval_seeds={self.eval_seeds!r} must be a non-empty list of ints, e.g. [10, 20, 30]")
        if self.select_metric == "rougeL" and self.valid_data and not self.eval_generate:
            raise ConfigError("select_metric='rougeL' needs eval_generate=true (or select_metric=loss / none)")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} must be < max_length={self.max_length} "
                              f"(room is needed for the response)")
        if self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise ConfigError(f"max_prompt_length + max_new_tokens = {self.max_prompt_length + self.max_new_tokens} "
                              f"exceeds max_length={self.max_length}")
        if self.method == "minillm" and (self.top_k != 0 or self.top_p != 1.0):
            raise ConfigError(f"top_k={self.top_k}, top_p={self.top_p}: MiniLLM rollouts sample the full mixture "
                              f"(the importance weights assume it); use top_k=0 top_p=1.0")

        # batch arithmetic: every rank does the same number of micro-batches per step
        ws = world_size
        micro = self.micro_batch_size
        if self.batch_size % ws:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by the world size {ws}")
        if micro is not None and (self.batch_size // ws) % micro:
            raise ConfigError(f"micro_batch_size={micro} must divide the per-rank batch batch_size / world_size = "
                              f"{self.batch_size // ws}")
        if self.method == "minillm":
            if self.num_rollouts % self.batch_size:
                raise ConfigError(f"num_rollouts={self.num_rollouts} must be a multiple of batch_size="
                                  f"{self.batch_size} (each rollout buffer is split into mini-batches)")
            if self.num_rollouts % (self.rollout_batch_size * ws):
                raise ConfigError(f"num_rollouts={self.num_rollouts} must be a multiple of rollout_batch_size x "
                                  f"world size = {self.rollout_batch_size * ws} (generation chunks are dealt to "
                                  f"ranks)")
            if self.pt_data is not None and self.lm_coef > 0:
                n_micro = (self.batch_size // ws) // (micro or self.batch_size // ws)
                if self.pt_batch_size % (ws * n_micro):
                    raise ConfigError(f"pt_batch_size={self.pt_batch_size} must be divisible by world size x "
                                      f"micro-batches per step = {ws * n_micro}")

        # paths
        required = ["student", "train_data", "output_dir"]
        if needs_teacher(self):
            required.append("teacher")
        for key in required:
            if not getattr(self, key):
                raise ConfigError(f"{key} is required for method={self.method!r}; set it in the YAML file or "
                                  f"pass {key}=...")
        if check_paths:
            for key in ("student", "teacher", "tokenizer", "train_data", "valid_data", "pt_data", "seqkd_data"):
                value = getattr(self, key)
                if value is not None and not os.path.exists(value):
                    raise ConfigError(f"{key}={value!r} does not exist (paths are local: a save_pretrained "
                                      f"directory for models, a file for data)")
            if isinstance(self.resume, str) and not os.path.exists(self.resume):
                raise ConfigError(f"resume={self.resume!r} does not exist; pass a checkpoint file, or true for the "
                                  f"latest one in output_dir")
            earlier = ckpt.list_checkpoints(os.path.join(self.output_dir, "checkpoints"))
            if earlier and self.resume is False and not self.overwrite:
                raise ConfigError(f"output_dir={self.output_dir!r} holds checkpoints of an earlier run (up to step "
                                  f"{earlier[-1][0]}); pass resume=true to continue it, overwrite=true to start "
                                  f"afresh there, or another output_dir")

    def _check_teacher_cache(self, check_paths: bool) -> None:
        """``teacher_cache``: a method that distils from it, and (with ``check_paths``) a finished cache there whose
        lengths and temperature are those of this run. The tokenizer, data and template are compared when the
        trainer opens it (distill/teacher_cache.py)."""
        if self.method == "seqkd" and (self.seqkd_objective != "kd" or not self.seqkd_data):
            raise ConfigError(f"teacher_cache={self.teacher_cache!r} with method='seqkd' needs seqkd_objective=kd and "
                              f"seqkd_data (the teacher responses the cache was made over: generating them needs "
                              f"the live teacher); got seqkd_objective={self.seqkd_objective!r}, "
                              f"seqkd_data={self.seqkd_data!r}")
        if self.method not in ("kd", "seqkd"):
            raise ConfigError(f"teacher_cache={self.teacher_cache!r} works with method kd (or seqkd with its kd "
                              f"objective), not method={self.method!r} ({self.method} needs the live teacher's full "
                              f"distribution); drop teacher_cache or change the method")
        if not check_paths:
            return
        from .teacher_cache import CacheError, read_manifest

        try:
            manifest = read_manifest(self.teacher_cache)
        except CacheError as e:
            raise ConfigError(f"teacher_cache: {e}") from None
        if not manifest.get("complete"):
            raise ConfigError(f"teacher_cache={self.teacher_cache!r} is incomplete: run minillm-fast teacher-cache "
                              f"again with the same arguments to finish it")
        for key in ("max_length", "max_prompt_length"):
            if manifest.get(key) != getattr(self, key):
                raise ConfigError(f"teacher_cache={self.teacher_cache!r} was made with {key}={manifest.get(key)}, "
                                  f"this run has {key}={getattr(self, key)}; use the same value or rebuild the cache "
                                  f"with --{key.replace('_', '-')} {getattr(self, key)}")
        if manifest.get("temperature") != 1.0:
            raise ConfigError(f"teacher_cache={self.teacher_cache!r} holds a teacher tempered by "
                              f"T={manifest.get('temperature')}, but kd distils the untempered teacher; rebuild it "
                              f"with --temperature 1")


def needs_teacher(cfg: DistillConfig) -> bool:
    """Whether training itself reads the teacher: kd, minillm and okd always; seqkd to generate its data (no
    ``seqkd_data``) or for its kd objective; kd and seqkd not with a ``teacher_cache`` (it stands in for the teacher).
    (Any method also loads a given teacher to score validation.)"""
    if cfg.teacher_cache is not None and cfg.method in ("kd", "seqkd"):
        return False
    return cfg.method in ("kd", "minillm", "okd") or (
        cfg.method == "seqkd" and not (cfg.seqkd_data and cfg.seqkd_objective == "sft"))


def require_peft():
    """The ``peft`` module (method=okd's LoRA), or a :class:`ConfigError` that gives the install command."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError(f"method='okd' needs the peft library for the teacher's LoRA module ({e}); install it with "
                          f"{OKD_INSTALL} (or pip install peft)") from None
    return peft


def help_text() -> str:
    """``--help-config``: every key, its default and its help (the fields' metadata)."""
    lines = []
    for f in dataclasses.fields(DistillConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"  {f.name:22s} {_show(default):12s} {f.metadata['help']}")
    return "config keys (null = per-method default):\n" + "\n".join(lines)


def _show(value) -> str:
    """A default as YAML writes it (null, true, 1e-08, [10, 20])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
_FLOAT_KEYS = frozenset(f.name for f in dataclasses.fields(DistillConfig) if "float" in str(f.type))


def _coerce(key: str, value, float_keys) -> Any:
    """PyYAML reads ``1e-5`` (no dot) as a string: turn such strings into floats for float keys."""
    if key in float_keys and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if key in float_keys and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not supported{hint}; expected one of {', '.join(choices)}")


def _int(key: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an int >= {minimum}")


def _number(key: str, value, *, low=None, high=None, low_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}={value!r} must be <= {high}")


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f)
    return data or {}


def parse_overrides(items: Sequence[str]) -> dict:
    """``["lr=1e-5", "eval_seeds=[1,2]"]`` -> dict; values are parsed as YAML (``null``, ``true``, numbers, lists)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lr=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        out[key] = yaml.safe_load(raw) if raw.strip() else None
    return out


def dump_yaml(cfg: DistillConfig, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
