"""What the spec makes the plugin's job, checked once, in the agent, for both shims.

Both shims (compiled and Python) forward the plugin's environment and raw stdin unchanged; this
module turns them into a ``CniRequest`` or a ``CniError`` with the spec's code: the environment
(required variables per verb, the container ID and interface name rules), the config's JSON, its
name and version, and which verbs the version has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from plexus.cni import spec
from plexus.cni.config import CniError, CniRequest


def check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [k for k in spec.REQUIRED[command] if not env.get(k)]
    # Set but empty is "unknown container" (3) for skel; absent is a missing variable (4).
    if "CNI_CONTAINERID" in missing and "CNI_CONTAINERID" in env:
        raise CniError(spec.UNKNOWN_CONTAINER, "missing containerID")
    if missing:
        raise CniError(spec.INVALID_ENVIRONMENT,
                       f"required env variables [{','.join(missing)}] missing")
    cid = env.get("CNI_CONTAINERID", "")
    if cid and not spec.valid_name(cid):
        raise CniError(spec.INVALID_ENVIRONMENT, f"invalid characters in containerID {cid!r}")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK") and (
        len(ifname) > 15 or ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname)
    ):
        raise CniError(spec.INVALID_ENVIRONMENT, f"invalid CNI_IFNAME {ifname!r}")


def check_config(command: str, config: object) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise CniError(spec.DECODING_FAILURE,
                       "failed to decode network configuration: not a JSON object")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(spec.INVALID_CONFIG, "missing network name")
    if not spec.valid_name(name):
        raise CniError(spec.INVALID_CONFIG, f"invalid characters found in network name {name!r}")
    version = str(config.get("cniVersion", "0.1.0"))
    if version not in spec.VERSIONS:
        raise CniError(spec.INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(spec.VERSIONS)}")
    since = spec.SINCE.get(command)
    if since is not None and spec.version_tuple(version) < since:
        raise CniError(spec.INCOMPATIBLE_VERSION, f"config version does not allow {command}")
    return config


def prepare(argv0: str, env: Mapping[str, str], stdin: str) -> CniRequest:
    """The request the plugin was run for, or the CniError the runtime must get."""
    command = env.get("CNI_COMMAND", "")
    if command not in spec.REQUIRED:
        raise CniError(spec.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}")
    check_env(command, env)
    try:
        config = check_config(command, json.loads(stdin))
    except ValueError as exc:
        raise CniError(spec.DECODING_FAILURE,
                       f"failed to decode network configuration: {exc}") from None
    mode = "ipam" if argv0.rsplit("/", 1)[-1].endswith("-ipam") else "main"
    return CniRequest(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=env.get("CNI_ARGS", ""),
        config=config,
        mode=mode,
    )


def version_of(stdin: str) -> str:
    """The config's cniVersion, for the shape of an error (the latest if unreadable)."""
    try:
        data = json.loads(stdin)
    except ValueError:
        return spec.LATEST
    version = data.get("cniVersion", spec.LATEST) if isinstance(data, dict) else spec.LATEST
    return str(version)


def error_body(version: str, error: CniError) -> dict[str, Any]:
    body: dict[str, Any] = {"cniVersion": version, "code": error.code, "msg": error.message}
    if error.details:
        body["details"] = error.details
    return body
