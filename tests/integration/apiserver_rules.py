"""What a real API server refuses in the objects the operator creates (kmock accepts anything).

The name and label rules of k8s.io/apimachinery/pkg/util/validation (IsDNS1123Subdomain,
IsDNS1123Label, IsQualifiedName, IsValidLabelValue, IsEnvVarName, IsValidPortName) and the
parts of k8s.io/kubernetes/pkg/apis/{core,batch}/validation that apply to a ConfigMap, a Job and
its pod template. Notably, the Job's validation sees the template with the labels the API server
adds (`batch.kubernetes.io/job-name` and `job-name` = the Job's name), so a Job name longer than
63 characters is refused with 422 although it is a valid DNS subdomain.

`problems(obj)` lists the refusals as the API server words them (`field: Invalid value: ...`);
the harness's emulator answers 422 with them, and the property tests use them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

Obj = dict[str, Any]

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024
PORT_NAME_MAX = 15

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(f"^{_LABEL}$")
DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
QUALIFIED_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_VAR_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def _invalid(path: str, value: object, why: str) -> str:
    return f'{path}: Invalid value: "{value}": {why}'


def dns1123_subdomain(path: str, value: str) -> Iterator[str]:
    if len(value) > DNS1123_SUBDOMAIN_MAX:
        yield _invalid(path, value, f"must be no more than {DNS1123_SUBDOMAIN_MAX} characters")
    if not DNS1123_SUBDOMAIN.match(value):
        yield _invalid(
            path,
            value,
            "a lowercase RFC 1123 subdomain must consist of lower case "
            "alphanumeric characters, '-' or '.'",
        )


def dns1123_label(path: str, value: str) -> Iterator[str]:
    if len(value) > DNS1123_LABEL_MAX:
        yield _invalid(path, value, f"must be no more than {DNS1123_LABEL_MAX} characters")
    if not DNS1123_LABEL.match(value):
        yield _invalid(
            path,
            value,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
        )


def qualified_name(path: str, key: str) -> Iterator[str]:
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        yield _invalid(path, key, "prefix part must be non-empty")
    elif prefix:
        yield from dns1123_subdomain(path, prefix)
    if len(name) > QUALIFIED_NAME_MAX:
        yield _invalid(path, key, f"name part must be no more than {QUALIFIED_NAME_MAX} characters")
    if not QUALIFIED_NAME_PART.match(name):
        yield _invalid(
            path,
            key,
            "name part must consist of alphanumeric characters, '-', '_' "
            "or '.', and must start and end with an alphanumeric character",
        )


def label_value(path: str, value: str) -> Iterator[str]:
    if len(value) > LABEL_VALUE_MAX:
        yield _invalid(path, value, f"must be no more than {LABEL_VALUE_MAX} characters")
    if not LABEL_VALUE.match(value):
        yield _invalid(
            path,
            value,
            "a valid label must be an empty string or consist of "
            "alphanumeric characters, '-', '_' or '.'",
        )


def labels(path: str, values: Mapping[str, str] | None) -> Iterator[str]:
    for key, value in (values or {}).items():
        yield from qualified_name(path, key)
        yield from label_value(path, value)


def annotations_of(path: str, values: Mapping[str, str] | None) -> Iterator[str]:
    size = 0
    for key, value in (values or {}).items():
        yield from qualified_name(path, key)
        size += len(key) + len(value)
    if size > ANNOTATIONS_MAX_BYTES:
        yield f"{path}: Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"


def object_meta(meta: Obj, path: str = "metadata") -> Iterator[str]:
    name = meta.get("name") or ""
    if not name:
        yield f"{path}.name: Required value: name or generateName is required"
    else:
        yield from dns1123_subdomain(f"{path}.name", name)
    yield from labels(f"{path}.labels", meta.get("labels"))
    yield from annotations_of(f"{path}.annotations", meta.get("annotations"))
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                yield f"{path}.ownerReferences[{i}].{field}: Required value"


def pod_spec(spec: Obj, path: str) -> Iterator[str]:
    volumes = {}
    for i, volume in enumerate(spec.get("volumes") or []):
        where = f"{path}.volumes[{i}]"
        yield from dns1123_label(f"{where}.name", volume.get("name", ""))
        if volume.get("name") in volumes:
            yield f'{where}.name: Duplicate value: "{volume["name"]}"'
        volumes[volume.get("name")] = volume
        if "configMap" in volume:
            yield from dns1123_subdomain(f"{where}.configMap.name", volume["configMap"]["name"])
        if "persistentVolumeClaim" in volume and not volume["persistentVolumeClaim"].get(
            "claimName"
        ):
            yield f"{where}.persistentVolumeClaim.claimName: Required value"
    yield from labels(f"{path}.nodeSelector", spec.get("nodeSelector"))
    names = set()
    for i, container in enumerate(spec.get("containers") or []):
        where = f"{path}.containers[{i}]"
        yield from dns1123_label(f"{where}.name", container.get("name", ""))
        if container.get("name") in names:
            yield f'{where}.name: Duplicate value: "{container["name"]}"'
        names.add(container.get("name"))
        for j, env in enumerate(container.get("env") or []):
            if not ENV_VAR_NAME.match(env.get("name", "")):
                yield _invalid(
                    f"{where}.env[{j}].name",
                    env.get("name"),
                    "a valid environment "
                    "variable name must consist of alphabetic characters, digits, "
                    "'_', '-', or '.'",
                )
        for j, port in enumerate(container.get("ports") or []):
            name = port.get("name")
            if name is not None and (len(name) > PORT_NAME_MAX or not PORT_NAME.match(name)):
                yield _invalid(f"{where}.ports[{j}].name", name, "must be an IANA_SVC_NAME")
            if not 0 < int(port.get("containerPort", 0)) < 65536:
                yield _invalid(
                    f"{where}.ports[{j}].containerPort",
                    port.get("containerPort"),
                    "must be between 1 and 65535, inclusive",
                )
        mount_paths = set()
        for j, mount in enumerate(container.get("volumeMounts") or []):
            if mount.get("name") not in volumes:
                yield f'{where}.volumeMounts[{j}].name: Not found: "{mount.get("name")}"'
            if mount.get("mountPath") in mount_paths:
                yield f"{where}.volumeMounts[{j}].mountPath: Invalid value: must be unique"
            mount_paths.add(mount.get("mountPath"))


def job(obj: Obj) -> Iterator[str]:
    name = obj.get("metadata", {}).get("name", "")
    template = obj.get("spec", {}).get("template", {})
    # the API server adds these labels (= the Job's name) to the template before validating it
    added = dict.fromkeys(JOB_NAME_LABELS, name)
    template_labels = {**(template.get("metadata", {}).get("labels") or {}), **added}
    yield from labels("spec.template.metadata.labels", template_labels)
    spec = template.get("spec", {})
    if spec.get("restartPolicy") not in ("Never", "OnFailure"):
        yield _invalid(
            "spec.template.spec.restartPolicy",
            spec.get("restartPolicy"),
            'supported values: "OnFailure", "Never"',
        )
    yield from pod_spec(spec, "spec.template.spec")


def problems(obj: Obj) -> list[str]:
    """Why the API server would refuse to create `obj` (empty: it would accept it)."""
    found = list(object_meta(obj.get("metadata") or {}))
    kind = obj.get("kind")
    if kind == "Job":
        found += job(obj)
    elif kind == "Pod":
        found += pod_spec(obj.get("spec") or {}, "spec")
    return found
