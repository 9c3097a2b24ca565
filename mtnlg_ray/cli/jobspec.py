"""A stage's Ray Job, built on this machine: `mtnlg-ray submit STAGE ...` parses the stage's arguments
with that stage's own CLI command and validates its config here, so a bad key fails before anything is
sent; local paths become absolute and the config as set (shipped file, `--config`, `--set`) becomes one
file (`JobSpec`), which `mtnlg_ray.jobs` then submits; the job derives the rest as a local run does.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path, PurePath

from mtnlg_ray.apikey import BLANK_KEY, api_key_digest, is_blank
from mtnlg_ray.config import CONFIG_STAGES, STAGE_SECTIONS, absolute_path, absolute_paths, label_overrides
from mtnlg_ray.errors import ConfigError, MtnlgError, first_line
from mtnlg_ray.jobs import CONFIG_NAME, JobSpec

# Stage name → the words of its own command (`mtnlg-ray data prepare ...`).
STAGES: dict[str, tuple[str, ...]] = {
    "prepare": ("data", "prepare"),
    "label": ("data", "label"),
    "pretrain": ("pretrain",),
    "finetune": ("finetune",),
    "self-train": ("self-train",),
    "serve": ("serve",),
}
# Options that carry a secret: a job gets only its SHA-256, in the environment variable its command
# reads, never the secret: the entrypoint and the runtime_env (its environment variables) are both
# shown by `ray job list` and the dashboard, and Ray's runtime-env agent logs the latter.
SECRET_OPTIONS = {"--api-key": "MTNLG_API_KEY_SHA256"}


def build_job(root, stage: str, args: list[str], cwd: str | Path | None = None, env: list[str] = ()) -> JobSpec:
    """Parse and validate a stage's arguments with its command under `root` (the `mtnlg-ray` click
    group); relative paths become absolute against `cwd`."""
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    if stage not in STAGES:
        raise MtnlgError(f"unknown stage '{stage}' (expected one of {', '.join(STAGES)})")
    env_vars = _parse_env(env)
    words = STAGES[stage]
    command = _stage_command(root, words)
    ctx = _parse(command, words, args)
    argv = list(words)
    config_param = _param(command, "--config")
    set_param = _param(command, "--set")
    for param in command.params:
        if param in (config_param, set_param):
            continue
        source = ctx.get_parameter_source(param.name)
        if getattr(param, "envvar", None) == "MTNLG_API_KEY_SHA256" and getattr(source, "name", "") == "ENVIRONMENT":
            # A digest is no secret: this machine's ships as a key from its MTNLG_API_KEY does (the job
            # used to serve with no key at all, the environment being "the cluster's own to supply").
            env_vars.setdefault(param.envvar, str(ctx.params[param.name]))
            continue
        secret = next((SECRET_OPTIONS[o] for o in getattr(param, "opts", ()) if o in SECRET_OPTIONS), None)
        if secret is not None:  # from the command line or this machine's environment alike
            if ctx.params.get(param.name) is not None:
                key = str(ctx.params[param.name])
                if is_blank(key):
                    raise ConfigError(f"{param.opts[0]}: {BLANK_KEY}")
                env_vars.setdefault(secret, api_key_digest(key))
            continue
        argv += _tokens(param, ctx.params.get(param.name), source, cwd)
    if stage == "serve":  # refused here, not on the cluster after the job started
        from mtnlg_ray.cli.serve import serve_args

        serve_args(ctx.params)
    config_yaml = None
    if config_param is not None:
        import yaml

        overrides = list(ctx.params.get(set_param.name) or []) if set_param is not None else []
        if stage == "label":  # `data label` lays its --labeler and --model over the config
            overrides += label_overrides(ctx.params["labeler"], ctx.params["model"])
        config = _load_stage_config(stage, ctx.params.get(config_param.name), overrides)
        config = absolute_paths(config, cwd)
        # Only what was set (by the stage's file, --config or --set): the cluster derives the rest as a
        # local run does. The whole dump used to fix the derived warm-up and decay at the schema's
        # MT-NLG values, so a submitted fine-tune warmed up over 1B tokens and learned nothing.
        # And only the sections the stage reads: a made-absolute run.storage_path in a prepare job's file
        # was warned about there as a section data prepare never reads.
        sections = set(STAGE_SECTIONS[CONFIG_STAGES[stage]])
        config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True, include=sections),
                                     sort_keys=False)
        argv += ["--config", CONFIG_NAME]
    return JobSpec(stage=stage, argv=argv, config_yaml=config_yaml, env_vars=env_vars)


def _stage_command(root, words: tuple[str, ...]):
    """The click command behind `mtnlg-ray <words>`: the stage parses its own arguments."""
    command = root
    for word in words:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            raise MtnlgError(f"this mtnlg-ray has no `{' '.join(words)}` command to submit")
        command = sub
    return command


def _parse(command, words: tuple[str, ...], args: list[str]):
    import click
    import typer

    usage_errors = tuple({click.ClickException, typer.TyperException})  # typer >= 0.20 ships its own click
    try:
        return command.make_context(" ".join(words), list(args), resilient_parsing=False)
    except usage_errors as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise MtnlgError(f"submit {' '.join(words)}: {first_line(message)}") from None


def _param(command, flag: str):
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def _tokens(param, value, source, cwd: Path) -> list[str]:
    """A parsed parameter back as command-line tokens, paths made absolute; defaults are left out."""
    if param.param_type_name == "argument":  # the stages' positional arguments are all INPUTs
        values = value if isinstance(value, (list, tuple)) else [value]
        return [absolute_path(str(v), cwd) for v in values if v is not None]
    if source is None or getattr(source, "name", "") != "COMMANDLINE":
        return []  # defaults and environment variables are the cluster's own to supply
    flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if getattr(param, "is_flag", False) and isinstance(value, bool):
        if value:
            return [flag]
        return [param.secondary_opts[0]] if param.secondary_opts else []
    # A path option by its type: typer 0.28 parses it to a str and makes the Path only when it calls
    # the command (its --output went to the cluster relative); 0.29 gives a Path here, and no param.type.
    is_path = getattr(getattr(param, "type", None), "name", None) == "path"
    tokens: list[str] = []
    for item in (value if getattr(param, "multiple", False) else [value]):
        parts = item if isinstance(item, tuple) else (item,)
        tokens += [flag, *(_token(part, cwd, is_path) for part in parts)]
    return tokens


def _token(value, cwd: Path, is_path: bool = False) -> str:
    if is_path or isinstance(value, PurePath):
        return absolute_path(str(value), cwd)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _load_stage_config(stage: str, path, overrides: list[str]):
    from mtnlg_ray.config import load_config, shipped_config

    config_stage = CONFIG_STAGES[stage]
    if path is None:
        try:
            shipped_config(config_stage)
        except ConfigError:
            config_stage = "pretrain"  # a stage whose own defaults have not shipped yet
    return load_config(path, overrides, stage=config_stage)


def _parse_env(items) -> dict[str, str]:
    env = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MtnlgError(f"--env {item}: expected KEY=VALUE")
        if key.strip() == "MTNLG_API_KEY":  # it would ship as it is, where --api-key ships only its digest
            raise ConfigError("--env MTNLG_API_KEY: a job's environment shows in `ray job list` and the dashboard; "
                              "a serve job takes its key from --api-key (or this machine's MTNLG_API_KEY) and gets "
                              "only its SHA-256")
        env[key.strip()] = value
    return env
