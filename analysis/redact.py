"""No secret reaches an evidence packet: every packet writer passes what it writes through here.

Packets are meant to be shared (attached to issues, committed under docs/evidence/), so a secret
must not get in even when a user puts one where it does not belong. Redaction must also never
change what a packet says about a run: a config that is not the config that ran, or an engine
kind blanked because an env var happens to hold the same word, makes the packet a lie. So each
net removes only what is a secret:
- credential shapes (Hugging Face, OpenAI, AWS, GitHub, Slack tokens, `Bearer ...` headers),
  anywhere;
- values under keys that name a secret (`hf_token`, `api_key`, `password`, `*_secret`...);
- the values of this process's environment variables whose names say TOKEN, KEY, SECRET,
  PASSWORD or CREDENTIAL (8 characters or longer, so flags like `1` or `true` are left alone),
  or that a config names as its key (`target.api_key_env`), where they stand as a whole word of
  free text: a string with whitespace (an HTTP error body, a traceback, model or dataset text).
  A one-word string is an identifier (an enum value, a path, a hash, a model name): a secret
  value there cannot be told from a word the run means (`SOME_TOKEN=reference` is not a reason
  to blank `engine.kind: reference`), so only its shape can mark it.
The config hash is computed before redaction, so it still identifies the config that ran.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

import numpy as np

REDACTED = "<redacted>"
_MIN_SECRET_LEN = 8
_SECRET_ENV_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SECRET_KEY_NAME = re.compile(
    r"^(token|api_?key|apikey|hf_token|access_token|auth_token|bearer_token|refresh_token|id_token|secret|"
    r"client_secret|secret_key|private_key|password|passwd|credentials?|aws_access_key_id|aws_secret_access_key|"
    r"aws_session_token|.*_api_key|.*_secret|.*_secret_key|.*_password|.*_access_token|.*_auth_token)$",
    re.IGNORECASE,
)
_SECRET_SHAPES = re.compile(
    r"hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style API keys
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"  # Authorization header values
)
_WHITESPACE = re.compile(r"\s")


# Variables a config names as holding a secret (target.api_key_env), whatever their names.
_NAMED_SECRET_ENV: set[str] = set()


def treat_env_as_secret(name: str) -> None:
    _NAMED_SECRET_ENV.add(name)


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if (_SECRET_ENV_NAME.search(k) or k in _NAMED_SECRET_ENV) and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first: a secret containing another goes whole


@lru_cache(maxsize=64)
def _as_word(secret: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(secret)}(?!\w)")


def redact_shapes(text: str) -> str:
    """Credential shapes only: for documents built from files that were redacted when written
    (reports), whose prose must not lose a word that only looks like an env var's value."""
    return _SECRET_SHAPES.sub(REDACTED, text)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Free text (an error body, a traceback, a log): secret env values as whole words, and shapes."""
    if _WHITESPACE.search(text):
        for s in secret_env_values() if secrets is None else secrets:
            if s in text:
                text = _as_word(s).sub(REDACTED, text)
    return redact_shapes(text)


# Values that hold no text: a list of only these (token ids, ITL gaps, per-token times) is returned
# after one pass over its item types instead of a call per item (thousands per request on a GPU).
_NO_TEXT = frozenset({int, float, bool, type(None)})


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, str) and isinstance(b, str) and a == b)


def redact_value(obj: Any, secrets: list[str] | None = None) -> Any:
    """Any JSON-like or columnar value (dicts, lists, tuples, object arrays): keys that name a
    secret are blanked, strings redacted; everything else comes back as it was (the same object
    where nothing changed, so callers can tell cheaply)."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        out = {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY_NAME.match(k) and v not in (None, "") else redact_value(v, secrets))
            for k, v in obj.items()
        }
        return obj if all(_same(out[k], obj[k]) for k in obj) else out
    if isinstance(obj, (list, tuple)):
        if all(type(v) in _NO_TEXT for v in obj):
            return obj
        items = [redact_value(v, secrets) for v in obj]
        if all(_same(a, b) for a, b in zip(items, obj, strict=True)):
            return obj
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "OUS":
        before = obj.tolist()
        items = [redact_value(v, secrets) for v in before]
        if all(_same(a, b) for a, b in zip(items, before, strict=True)):
            return obj
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr
    return obj


def redact_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """A JSON-like structure with secret-named keys blanked and secret values replaced."""
    return redact_value(obj, secrets)
