"""A remote MLflow tracking server: checked before any compute, and outages survived.

`check` asks the server one cheap question with a short timeout before a stage spends compute:
an unreachable server or rejected credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, MLflow's
own variables) stop the stage with one line in seconds, where MLflow itself retries for minutes
and ends in a traceback. URLs are shown without any user:password they may hold.

`Buffered` keeps a long training alive through an outage: a logging call that cannot reach the
server is kept and sent again with the next call (at most every RETRY_S seconds) and when the run
ends; what never got through is written to a folder with the one command that logs it later.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from .errors import UserError

# Long enough for a busy server across a network; MLflow itself would retry for over 4 minutes.
CHECK_TIMEOUT_S = 20.0
RETRY_S = 10.0
# Where the calls of a run that the server never got wait, under the project root (git-ignored):
# mlflow-pending/<run id>/.
PENDING = "mlflow-pending"
LOG_PENDING_COMMAND = "cyclegan log-pending"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(uri: str) -> str:
    """`uri` without a user:password in its network location."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _auth_header() -> dict[str, str]:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def check(uri: str, experiment: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise a one-line UserError unless the server at `uri` answers as MLflow and accepts the
    credentials; nothing to check for a local store (sqlite, folder)."""
    if not is_remote(uri):
        return
    shown = redact(uri)
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                     headers=_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        body = e.read(2000).decode("utf-8", "replace")
        if e.code == 404 and "RESOURCE_DOES_NOT_EXIST" in body:
            return  # an MLflow server without the experiment yet: the stage creates it
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if e.code == 401:
            given = f"user '{user}'" if user else "no credentials"
            raise UserError(f"the MLflow tracking server {shown} (MLFLOW_TRACKING_URI) rejected {given}; "
                            f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account "
                            f"of it") from None
        if e.code == 403:
            raise UserError(f"the MLflow tracking server {shown} does not let user '{user}' read experiment "
                            f"'{experiment}'; ask its admin for access") from None
        raise UserError(f"the MLflow tracking server {shown} (MLFLOW_TRACKING_URI) answered HTTP {e.code}, "
                        f"not as an MLflow server; check the URL") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"the MLflow tracking server {shown} (MLFLOW_TRACKING_URI) is unreachable "
                        f"({reason}); start it or correct MLFLOW_TRACKING_URI (unset, runs go to "
                        f"mlflow.db)") from None


def unreachable(error: BaseException) -> bool:
    """Whether `error` means the server could not be reached (as opposed to a refused request)."""
    import requests

    e: BaseException | None = error
    while e is not None:
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
            return True
        text = str(e)
        if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class Buffered:
    """The `mlflow` module of an active run, whose logging survives the server going away.

    Wrapped: log_metrics, log_params, set_tags, set_tag, log_image, log_artifact. A call that finds the
    server unreachable is kept (images and files copied into the pending folder, as they may
    change) and retried; everything else passes through to mlflow.
    """

    WRAPPED = ("log_metrics", "log_params", "set_tags", "set_tag", "log_image", "log_artifact")

    def __init__(self, mlflow, run_id: str, folder: Path, say: Callable[[str], None] = print):
        self._mlflow = mlflow
        self.run_id = run_id
        self.folder = folder
        self.pending: list[dict[str, Any]] = []
        self._last_try = 0.0
        self._kept = 0  # numbers the kept files' folders; never reused, unlike positions in `pending`
        self._say = say
        self._warned = False

    def __getattr__(self, name: str):
        if name in self.WRAPPED:
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return getattr(self._mlflow, name)

    def _keep(self, name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call as JSON: an image or a file is copied into the pending folder first."""
        # One folder per call: the file keeps its name, which becomes the artifact's.
        self._kept += 1
        folder = self.folder / f"{self._kept:06d}"
        if name == "log_image":
            from PIL import Image

            image, artifact_file = args[0], (args[1] if len(args) > 1 else kwargs.get("artifact_file"))
            folder.mkdir(parents=True)
            path = folder / (Path(artifact_file).name if artifact_file else "image.png")
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
            if artifact_file is None:  # an image under a key and step (MLflow's image view)
                return {"call": "log_image", "args": [str(path)],
                        "kwargs": {"key": kwargs["key"], "step": kwargs.get("step") or 0}}
            return {"call": "log_artifact", "args": [str(path), str(Path(artifact_file).parent)],
                    "kwargs": {}}
        if name == "log_artifact":
            source = Path(args[0])
            folder.mkdir(parents=True)
            shutil.copyfile(source, folder / source.name)
            return {"call": "log_artifact", "args": [str(folder / source.name), *args[1:]], "kwargs": kwargs}
        if name == "set_tag":
            return {"call": "set_tags", "args": [{args[0]: args[1]}], "kwargs": {}}
        if name == "log_metrics":  # the time it was measured, not the time it reached the server
            return {"call": name, "args": list(args), "kwargs": kwargs, "time_ms": int(time.time() * 1000)}
        return {"call": name, "args": list(args), "kwargs": kwargs}

    def _call(self, name: str, *args, **kwargs) -> None:
        self.flush(force=False)
        if self.pending:  # keep the order: the server has not taken the earlier calls yet
            self.pending.append(self._keep(name, args, kwargs))
            return
        try:
            getattr(self._mlflow, name)(*args, **kwargs)
        except Exception as e:
            if not unreachable(e):
                raise
            self.pending.append(self._keep(name, args, kwargs))
            self._last_try = time.monotonic()
            if not self._warned:
                self._warned = True
                self._say(f"cyclegan: the MLflow tracking server is unreachable; training goes on, and "
                          f"what it logs meanwhile is kept in {self.folder} and sent when the server is back")

    def flush(self, force: bool = True) -> bool:
        """Send the kept calls (unless the last try was under RETRY_S ago and not `force`); True
        when none is left."""
        if not self.pending:
            return True
        if not force and time.monotonic() - self._last_try < RETRY_S:
            return False
        self._last_try = time.monotonic()
        client = self._mlflow.MlflowClient()
        while self.pending:
            try:
                replay(client, self.run_id, self.pending[0])
            except Exception as e:
                if not unreachable(e):
                    raise
                return False
            self.pending.pop(0)
        shutil.rmtree(self.folder, ignore_errors=True)
        self._say("cyclegan: the MLflow tracking server is back; everything kept meanwhile is logged")
        return True

    def save(self) -> None:
        """Write what is still pending to the folder, for LOG_PENDING_COMMAND."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".calls.json.tmp"
        tmp.write_text(json.dumps(self.pending))
        tmp.replace(self.folder / "calls.json")


def replay(client, run_id: str, record: dict[str, Any]) -> None:
    """One kept call, sent to run `run_id` with an MlflowClient."""
    from mlflow.entities import Metric, Param, RunTag

    args, kwargs, call = record["args"], record["kwargs"], record["call"]
    if call == "log_metrics":
        when, step = record.get("time_ms") or int(time.time() * 1000), kwargs.get("step") or 0
        client.log_batch(run_id, metrics=[Metric(k, float(v), when, step) for k, v in args[0].items()])
    elif call == "log_params":
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in args[0].items()])
    elif call == "set_tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in args[0].items()])
    elif call == "log_artifact":
        client.log_artifact(run_id, args[0], args[1] if len(args) > 1 else kwargs.get("artifact_path"))
    elif call == "log_image":
        from PIL import Image

        with Image.open(args[0]) as image:
            client.log_image(run_id, image.copy(), key=kwargs["key"], step=kwargs["step"])
    elif call == "set_terminated":
        client.set_terminated(run_id, record.get("status", "FINISHED"))
    else:
        raise ValueError(f"unknown kept call {call}")


def describe(records: list[dict[str, Any]]) -> str:
    """What `records` hold, for a person: '12 metric records, 3 files, the generator models'."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["call"]] = counts.get(record["call"], 0) + 1
    words = {"log_metrics": "metric records", "log_params": "param records", "set_tags": "tag records",
             "log_artifact": "files", "log_image": "images", "log_generators": "generator models",
             "set_terminated": "end-of-run marks"}
    return ", ".join(f"{n} {words.get(call, call)}" for call, n in counts.items())


@contextmanager
def surviving_outages(mlflow, resume_run_id: str | None, run_name: str | None, root: Path,
                      say: Callable[[str], None] = print) -> Iterator[Buffered]:
    """Start (or reopen) the run on a remote server; yields it as `Buffered`. When it ends, what
    was kept is sent; what still cannot be is saved, and one line says what and how to send it."""
    # MLflow retries an unreachable server for minutes in every call; kept calls are retried here.
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(key, value)
    run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name,
                           log_system_metrics=True)
    buffered = Buffered(mlflow, run.info.run_id, root / PENDING / run.info.run_id, say)
    status = "FINISHED"
    try:
        yield buffered
    except Exception as e:
        if not unreachable(e):
            status = "FAILED"
            raise
        # Only the generators' models are logged outside Buffered after the outputs are written.
        buffered.pending.append({"call": "log_generators", "args": [], "kwargs": {}})
    except BaseException:
        status = "KILLED"
        raise
    finally:
        for _ in range(3):
            if buffered.flush() or status != "FINISHED":
                break
            time.sleep(RETRY_S)
        try:
            mlflow.end_run(status)
        except Exception as e:
            if not unreachable(e):
                raise
            buffered.pending.append({"call": "set_terminated", "args": [], "kwargs": {}, "status": status})
        if buffered.pending:
            buffered.save()
            say(f"cyclegan train: the MLflow tracking server {redact(mlflow.get_tracking_uri())} is "
                f"unreachable: {describe(buffered.pending)} are not logged to run {buffered.run_id} "
                f"(kept in {buffered.folder}); run `{LOG_PENDING_COMMAND}` when it is back")


def pending_runs(root: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run id, kept calls) of every run with calls kept under root/PENDING."""
    found = sorted((root / PENDING).glob("*/calls.json"))
    return [(calls.parent.name, json.loads(calls.read_text())) for calls in found]


def mark_sent(root: Path, run_id: str, remaining: list[dict[str, Any]]) -> None:
    """Record that only `remaining` of run_id's kept calls are left (a second outage resumes there)."""
    calls = root / PENDING / run_id / "calls.json"
    if not remaining:
        shutil.rmtree(calls.parent)
        return
    tmp = calls.with_name(".calls.json.tmp")
    tmp.write_text(json.dumps(remaining))
    tmp.replace(calls)
