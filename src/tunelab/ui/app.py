"""`tunelab ui`: a local dashboard over the run folders. A runs table that refreshes itself,
a run's results, files, plots and metric curves, a comparison of several runs (results,
curves, the config and environment keys that differ), and a form that starts `tunelab train`
from a recipe and follows it live.

Why a FastAPI app and one static page, not Gradio: FastAPI and uvicorn are already tunelab
dependencies (`tunelab serve`), whereas Gradio would add about 100 MB of packages and a server
of its own; the pages here are tables, line plots and a form, which plain HTML and a few
hundred lines of JavaScript draw without a build step or a CDN (the page works offline).

Everything shown is read from the run folders with `tunelab.experiments`, the code behind
`tunelab runs list/show/diff/compare`, so the dashboard and the command line always agree;
the server keeps no state besides the training it started.

    GET  /api/runs                        the runs table
    GET  /api/run?run=ID                  one run: status, config, env, results, files, plots,
                                          progress
    GET  /api/curves?run=ID&run=ID2[&metric=M]   training loss and validation M by step
    GET  /api/diff?run=ID&run=ID2[&run=...]      config and env keys that differ, results
    GET  /api/plot?run=ID&path=confusion_test.png  a PNG inside a run folder
    GET  /api/recipes                     recipes found (configs/ by default)
    GET  /api/recipe?path=P               a recipe's resolved fields: value, type, doc
    POST /api/form   {recipe, values}     the fields with the form's edits, the command line
    POST /api/train  {recipe, values, name?}   start `tunelab train` (one at a time)
    GET  /api/train                       that training: state, progress, log tail
    POST /api/train/stop                  Ctrl-C it (resumable)

A run is named by its path below the runs folder (ID, e.g. `search-x/trials/trial-003`).
Errors are JSON `{"error": {"type", "message", "field"?}}`.
"""
from __future__ import annotations

import datetime as dt
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

import tunelab
from tunelab import experiments
from tunelab.config import resolve_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.ui import forms, jobs

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost")
NOT_PLOTS = {"state", "best", "tb", "wandb", "model", "adapter", "tokenizer"}
"""Run subfolders that hold weights or tracker files, never plots worth showing."""


@dataclass
class UiSettings:
    runs: str = "runs"
    """Folder whose runs are shown (searched recursively) and where new trainings go."""
    recipes: str | None = None
    """Folder of recipes offered by the form. Unset: configs/ when it exists here."""
    host: str = "127.0.0.1"
    """Interface to bind. Loopback unless asked otherwise: the page can start trainings."""
    port: int = 7860
    """Port to listen on."""

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535; got {self.port}")
        if self.recipes is not None and not Path(self.recipes).is_dir():
            raise ConfigError(f"--recipes {self.recipes} is not a folder")
        if Path(self.runs).exists() and not Path(self.runs).is_dir():
            raise ConfigError(f"--runs {self.runs} is not a folder")

    def recipes_dir(self) -> Path | None:
        if self.recipes is not None:
            return Path(self.recipes).resolve()
        return Path("configs").resolve() if Path("configs").is_dir() else None


class UiError(TunelabError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FormRequest(BaseModel):
    recipe: str = Field("", description="a recipe as /api/recipes names it; '' = defaults")
    values: dict[str, str] = Field({}, description="field key -> text as the form shows it")


class TrainRequest(FormRequest):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                             description="run folder name (default: date-time-recipe-method)")


# --------------------------------------------------------------------------------------------
# reading runs


def run_dir_of(root: Path, run: str) -> Path:
    """The run folder an ID names; an ID that leaves the runs folder is refused."""
    path = (root / run).resolve()
    if not path.is_relative_to(root):
        raise UiError(400, f"run {run!r} is outside the runs folder")
    if not (path / "config.yaml").is_file():
        raise UiError(404, f"no run {run!r} in {root}")
    return path


def run_rows(root: Path) -> list[dict]:
    """`tunelab runs list` as data, newest first; a run whose files cannot be read is listed
    with the reason instead of hiding every other run."""
    if not root.is_dir():
        return []
    rows = []
    for run_dir in experiments.find_runs(root):
        rid = jobs.run_id(run_dir, root)
        try:
            row = experiments.summarize(run_dir)
        except TunelabError as e:
            rows.append({"id": rid, "status": "unreadable", "error": str(e), "started": None})
            continue
        row["id"] = rid
        row["error"] = experiments.read_status(run_dir).get("error")
        rows.append(row)
    return sorted(rows, key=lambda r: r["started"] or "", reverse=True)


def run_detail(root: Path, run_dir: Path) -> dict:
    return {"id": jobs.run_id(run_dir, root), "path": str(run_dir),
            "summary": experiments.summarize(run_dir),
            "status": experiments.read_status(run_dir),
            "config": experiments.read_config(run_dir),
            "env": experiments.read_optional_json(run_dir / "env.json"),
            "results": experiments.read_optional_json(run_dir / "results.json"),
            "preflight": experiments.read_optional_json(run_dir / "preflight.json"),
            "files": run_files(run_dir), "plots": run_plots(run_dir),
            "progress": jobs.progress(run_dir),
            "log": jobs.log_tail(run_dir / jobs.LOG_FILE)}


def run_files(run_dir: Path) -> list[dict]:
    out = []
    for path in sorted(run_dir.iterdir()):
        if path.name.startswith("."):
            continue
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        out.append({"name": path.name, "dir": path.is_dir(), "bytes": sum(map(_size, files))})
    return out


def _size(path: Path) -> int:
    """A running training replaces state/ and best/ while they are listed: a file gone
    between listing and measuring counts as empty."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def run_plots(run_dir: Path) -> list[str]:
    """PNGs the run wrote (confusion matrices; eval, explain and monitor reports)."""
    found = []
    for path in sorted(run_dir.rglob("*.png")):
        parts = path.relative_to(run_dir).parts
        if parts[0] not in NOT_PLOTS and not any(p.startswith(".") for p in parts):
            found.append(Path(*parts).as_posix())
    return found


def plot_file(run_dir: Path, path: str) -> Path:
    """A PNG inside the run folder; anything else (`..`, absolute paths, links leading out,
    other file types) is refused."""
    target = (run_dir / path).resolve()
    if not target.is_relative_to(run_dir) or target.suffix.lower() != ".png":
        raise UiError(400, f"{path!r} is not a PNG inside run {run_dir.name}")
    if not target.is_file():
        raise UiError(404, f"run {run_dir.name} has no {path}")
    return target


def run_curves(root: Path, ids: list[str], metric: str | None) -> dict:
    """What `tunelab runs compare` plots, as data: per run the training loss and validation
    `metric` by step, and the best value."""
    dirs = [run_dir_of(root, r) for r in ids]
    first = experiments.read_config(dirs[0])
    metric = metric or experiments.task_metric(first) or "loss"
    lower = experiments.lower_is_better(first, metric)
    logged, out = set(), []
    for rid, run_dir in zip(ids, dirs):
        loss, val = experiments.curves(run_dir, metric)
        logged |= {k for rec in experiments.read_metrics(run_dir)
                   if rec.get("split") == "validation" for k, v in rec.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"step"}
        step, best = (min if lower else max)(val, key=lambda sv: sv[1]) if val else (None, None)
        out.append({"run": rid, "loss": loss, "validation": val, "best": best,
                    "best_step": step})
    return {"metric": metric, "lower_is_better": lower, "metrics": sorted(logged), "runs": out}


def run_diff(root: Path, ids: list[str]) -> dict:
    """Results of each run and the config and env keys whose values differ between them
    (`tunelab runs diff` for two runs, the same rule for more)."""
    dirs = [run_dir_of(root, r) for r in ids]
    configs = [experiments.read_config(d) for d in dirs]
    envs = [experiments.read_optional_json(d / "env.json") for d in dirs]
    return {"runs": ids, "summaries": [experiments.summarize(d) for d in dirs],
            "results": [experiments.read_optional_json(d / "results.json") for d in dirs],
            "config": differences(configs, {"run_dir"}),
            "env": differences(envs, {"created", "config_hash"})}


def differences(trees: list[dict], left_out: set[str]) -> list[dict]:
    flat = [experiments.flatten(t) for t in trees]
    rows = []
    for key in sorted(set().union(*flat) - left_out):
        values = [f.get(key, experiments.UNSET) for f in flat]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            rows.append({"key": key, "values": values})
    return rows


# --------------------------------------------------------------------------------------------
# the app


def create_app(settings: UiSettings) -> FastAPI:
    root = Path(settings.runs).resolve()
    recipes = settings.recipes_dir()
    cwd = Path.cwd()
    launcher = jobs.Launcher(cwd)

    @asynccontextmanager
    async def lifespan(app):
        yield
        launcher.shutdown()

    app = FastAPI(title="tunelab ui", version=tunelab.__version__, lifespan=lifespan)
    app.state.launcher = launcher
    if settings.host in LOOPBACK:
        # a page on another site could otherwise reach this server through a DNS name that
        # resolves to 127.0.0.1 (DNS rebinding) and start trainings
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK))
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def runs_table():
        # the folder as the user named it: shorter than the resolved path, and what they typed
        return {"root": str(settings.runs), "runs": run_rows(root)}

    @app.get("/api/run")
    def one_run(run: str):
        return run_detail(root, run_dir_of(root, run))

    @app.get("/api/curves")
    def curves(run: list[str] = Query(...), metric: str | None = None):
        return run_curves(root, run, metric)

    @app.get("/api/diff")
    def diff(run: list[str] = Query(...)):
        if len(run) < 2:
            raise UiError(400, "give two runs or more to compare (run=A&run=B)")
        return run_diff(root, run)

    @app.get("/api/plot")
    def plot(run: str, path: str):
        return FileResponse(plot_file(run_dir_of(root, run), path), media_type="image/png")

    @app.get("/api/recipes")
    def recipe_list():
        return {"folder": str(recipes) if recipes else None,
                "recipes": forms.list_recipes(recipes)}

    @app.get("/api/recipe")
    def recipe(path: str = ""):
        return form_view(recipes, cwd, path, {})

    @app.post("/api/form")
    def form(body: FormRequest):
        return form_view(recipes, cwd, body.recipe, body.values)

    @app.post("/api/train", status_code=202)
    def start(body: TrainRequest):
        recipe_file, overrides = checked_overrides(recipes, body.recipe, body.values)
        config = resolve_config(recipe_file, overrides)
        forms.check_data_files(config, cwd)
        run_dir = root / (body.name or default_name(body.recipe, config.method.name))
        if run_dir.exists():
            raise UiError(409, f"{run_dir} already exists: pick another name")
        try:
            launcher.start(recipe_file, overrides, run_dir)
        except jobs.Busy as e:
            raise UiError(409, str(e)) from None
        return {"job": launcher.report(root)}

    @app.get("/api/train")
    def training():
        return {"job": launcher.report(root)}

    @app.post("/api/train/stop")
    def stop():
        launcher.stop()
        return {"job": launcher.report(root)}

    return app


def checked_overrides(recipes: Path | None, recipe: str,
                      values: dict[str, str]) -> tuple[str | None, list[str]]:
    recipe_file = forms.recipe_path(recipes, recipe)
    try:
        return recipe_file, forms.overrides_from_form(recipe_file, values)
    except ConfigError as e:
        keys = [r["key"] for r in forms.form_fields(resolve_config(recipe_file))]
        raise forms.FieldError(str(e), forms.error_field(str(e), list(values) + keys)) from None


def form_view(recipes: Path | None, cwd: Path, recipe: str, values: dict[str, str]) -> dict:
    """The form for `recipe` with `values` applied: fields, overrides and the command."""
    recipe_file, overrides = checked_overrides(recipes, recipe, values)
    fields = forms.form_fields(resolve_config(recipe_file, overrides))
    words = ["train", *([recipe_file] if recipe_file else []), *overrides]
    return {"recipe": recipe, "fields": fields, "overrides": overrides,
            "command": jobs.display_command(["python", "-m", "tunelab", *words], cwd)}


def default_name(recipe: str, method: str) -> str:
    """runs.new_run_dir's pattern with the recipe's name in it: 20260101-120000-sst2_lora."""
    stem = Path(recipe).stem if recipe else "default"
    name = stem if method in stem else f"{stem}-{method}"
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{name}"


def install_error_handlers(app: FastAPI) -> None:
    def error(status: int, kind: str, message: str, field: str | None = None):
        body = {"type": kind, "message": message}
        if field:
            body["field"] = field
        return JSONResponse({"error": body}, status)

    @app.exception_handler(UiError)
    async def ui_error(request: Request, e: UiError):
        return error(e.status, "not_found" if e.status == 404 else "invalid_request", str(e))

    @app.exception_handler(TunelabError)
    async def user_error(request: Request, e: TunelabError):
        return error(400, "invalid_config" if isinstance(e, ConfigError) else "error", str(e),
                     getattr(e, "field", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message = "; ".join(f"{'.'.join(str(x) for x in p['loc'] if x != 'body')}: {p['msg']}"
                            for p in e.errors()[:5])
        return error(422, "invalid_request", message)


# --------------------------------------------------------------------------------------------
# the command


def ui(settings: UiSettings) -> None:
    import uvicorn

    app = create_app(settings)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"tunelab ui: http://{shown}:{settings.port}/  (runs: {settings.runs}; recipes: "
          f"{settings.recipes_dir() or 'none'}; Ctrl-C stops it)", flush=True)
    if settings.host not in LOOPBACK:
        print(f"warning: listening on {settings.host}: anyone who can reach this port can read "
              "the runs and start trainings", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
