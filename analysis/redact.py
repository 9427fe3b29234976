"""No secret reaches an evidence packet: every packet writer passes what it writes through here.

Packets are meant to be shared (attached to issues, committed under docs/evidence/), so a secret
must not get in even when a user puts one where it does not belong. Three nets, applied to every
manifest, config, summary, report and string column:
- the values of this process's environment variables whose names say TOKEN, KEY, SECRET,
  PASSWORD or CREDENTIAL (8 characters or longer, so flags like `1` or `true` are left alone);
- values under config keys that name a secret (`hf_token`, `api_key`, `password`, `*_secret`...);
- strings shaped like well-known credentials (Hugging Face, OpenAI, AWS, GitHub, Slack tokens,
  `Bearer ...` headers).
The config hash is computed before redaction, so it still identifies the config that ran.
"""

from __future__ import annotations

import os
import re
from typing import Any

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


# Variables a config names as holding a secret (target.api_key_env), whatever their names.
_NAMED_SECRET_ENV: set[str] = set()


def treat_env_as_secret(name: str) -> None:
    _NAMED_SECRET_ENV.add(name)


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {
        v for k, v in env.items() if (_SECRET_ENV_NAME.search(k) or k in _NAMED_SECRET_ENV) and len(v) >= _MIN_SECRET_LEN
    }
    return sorted(vals, key=len, reverse=True)  # longest first: a secret containing another goes whole


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_env_values() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


def redact_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """A JSON-like structure with secret-named keys blanked and secret values replaced."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY_NAME.match(k) and v not in (None, "") else redact_obj(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj
