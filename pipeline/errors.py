"""The typed errors of the pipeline: each names what it is about, so nothing parses messages.

Every error has ``subject`` (a config key, a request field, a file or URL, a shard) and
``message``; ``str(e)`` is ``"subject: message"``. Subclasses add attributes (``field``, ``row``,
``failed``, ...). They pickle with their attributes, so one raised inside a Ray task arrives whole.
"""
from __future__ import annotations

from typing import Any

MAX_MESSAGE = 2000


class PipelineError(Exception):
    """An error about one named thing (see the module docstring). A subclass declares the subject's
    other name (``class ConfigError(PipelineError, alias="key")``: ``e.key == e.subject``)."""
    alias = "subject"

    def __init_subclass__(cls, alias: str = "subject", **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.alias = alias

    def __init__(self, subject: str, message: str, **attrs: Any):
        message = shorten(message, MAX_MESSAGE)      # a backstop: values echoed in it are cut to 200 already
        super().__init__(f"{subject}: {message}")
        self.subject, self.message = subject, message
        self.__dict__.update(attrs)
        self.__dict__.setdefault(self.alias, subject)

    def __reduce__(self):
        return self.__class__, (self.subject, self.message), self.__dict__


class ConfigError(PipelineError, ValueError, alias="key"):
    """A configuration key is unknown or its value is invalid."""


class RequestError(PipelineError, ValueError, alias="field"):
    """A request (manifest row or HTTP body) that the job or the model cannot serve; ``field`` names
    the field, as the manifest's and the HTTP API's error messages do."""


class ParameterError(PipelineError, ValueError, alias="name"):
    """A sampler, grid or calibration parameter that is invalid."""


class ManifestError(PipelineError, ValueError, alias="source"):
    """A manifest that cannot be read, or a row that fails validation: ``source`` is the file (or the
    template), and where known ``row`` and ``field`` say which row and field."""


class PlanError(PipelineError, ValueError, alias="source"):
    """A solver plan that is missing, unreadable, of another version, tampered with, or that does not fit."""


class StorageError(PipelineError, RuntimeError, alias="url"):
    """The output location cannot be read or written (the URL, never the credentials); storage errors
    worth retrying are retried before this is raised."""


class StorageUnavailable(StorageError, alias="url"):
    """Transient storage faults outlasted the retry budget (``output.storage_retry_s``): ``operation``
    (write, read, list, ...) on ``url`` failed ``attempts`` times. What was committed stays; a rerun
    resumes."""


class OutputConflict(PipelineError, RuntimeError, alias="url"):
    """The output already holds something else; ``changed``: the config keys that differ."""


class ErrorBudgetExceeded(PipelineError, RuntimeError, alias="where"):
    """More rows failed than the error budget allows: ``failed`` rows, ``budget``; ``where`` they are
    (the ``_errors/`` folder of the output)."""


class BudgetExhausted(PipelineError, RuntimeError, alias="key"):
    """A time budget (the config ``key``) ran out before all the work asked for was done; what was done is
    kept, and the message says where and what is missing."""


def caused_by(e: BaseException, cls: type[BaseException]) -> BaseException | None:
    """``e`` or the first exception in its cause chain (Ray task errors and Ray Data's ``SystemException``
    wrappers included) that is a ``cls``. A Ray task error that only poses as one (``RayTaskError(cls)``,
    whose ``str`` is a remote traceback) is unwrapped to the original error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, cls):
            while isinstance(getattr(e, "cause", None), cls) and e.cause is not e:
                e = e.cause
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with a note of its length, for echoing user input in errors."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def echo(value: object, limit: int = 200) -> str:
    """``repr(value)``, shortened like ``shorten``: how error messages quote a value they refuse."""
    return shorten(repr(value), limit)
