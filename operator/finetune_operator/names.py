"""Names and labels of a FineTuneJob's children: deterministic, and valid for every FineTuneJob name.

The API server accepts any DNS-1123 subdomain of up to 253 characters as a FineTuneJob name, but
a Job's name becomes the value of its pods' `job-name` label (at most 63 characters), and every
child carries the label `finetune.dev/job`. So a name that fits its limit is used as it is, and a
longer one keeps a prefix followed by `-` and 8 hex digits of the SHA-256 of the whole name: the
same on every pass, and different for two FineTuneJobs that share the prefix.

The Job's name is a DNS label with 3 characters of the label limit free: the pods of an
Indexed Job (a run of several pods) get the hostname `<Job name>-<index>`, a DNS label of at
most 63 characters. A name with dots gets dashes and the hash. The headless Service of such a
run is a DNS-1035 label (a letter first): `ftj-` and the name, by the same rule.

    run1                  -> Job run1, label finetune.dev/job=run1, ConfigMap run1-config,
                             Service ftj-run1
    <100-character name>  -> Job <first 51 characters>-<8 hex>, the same label value,
                             ConfigMap <100-character name>-config
    team.bot              -> Job team-bot-<8 hex>, ConfigMap team.bot-config
"""

from __future__ import annotations

import hashlib

LABEL_VALUE_MAX = 63  # k8s.io/apimachinery validation.LabelValueMaxLength
DNS1123_SUBDOMAIN_MAX = 253  # validation.DNS1123SubdomainMaxLength
HASH_CHARS = 8
CONFIGMAP_SUFFIX = "-config"
MAX_INDEX_SUFFIX = 3  # "-63": the widest "-<index>" of an Indexed Job of at most 64 pods
JOB_NAME_MAX = LABEL_VALUE_MAX - MAX_INDEX_SUFFIX
SERVICE_PREFIX = "ftj-"


def bounded_name(name: str, limit: int, suffix: str = "") -> str:
    """`name + suffix` when it has at most `limit` characters; otherwise a prefix of `name`, a dash, 8 hex digits of SHA-256(name) and `suffix`, exactly
    `limit` characters or fewer.

    For a DNS-1123 subdomain `name` (and a suffix of letters, digits and dashes) the result is a
    DNS-1123 subdomain too: the prefix never ends in `-` or `.`.
    """
    if len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    keep = limit - len(suffix) - HASH_CHARS - 1
    return f"{name[:keep].rstrip('-.')}-{digest}{suffix}"


def dns_label(name: str, limit: int, prefix: str = "") -> str:
    """`prefix + name` as a DNS label of at most `limit` characters: as it is when it has no
    dot and fits; else dots become dashes, cut to fit, with 8 hex digits of SHA-256(name)
    (so `a.b` and `a-b`, or two long names sharing a prefix, stay apart)."""
    label = prefix + name
    if "." not in name and len(label) <= limit:
        return label
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    keep = limit - HASH_CHARS - 1
    return f"{label.replace('.', '-')[:keep].rstrip('-')}-{digest}"


def job_name(name: str) -> str:
    """The batch/v1 Job of FineTuneJob `name`: a DNS label of at most 60 characters (it is a
    label value, and `<Job name>-<index>` is the hostname of an Indexed Job's pods)."""
    return dns_label(name, JOB_NAME_MAX)


def job_label(name: str) -> str:
    """The value of the `finetune.dev/job` label on the children of FineTuneJob `name`: its
    Job's name, so `kubectl get pods -l finetune.dev/job=<Job name>` lists the trainer pods."""
    return job_name(name)


def configmap_name(name: str) -> str:
    """The ConfigMap holding the run config of FineTuneJob `name`."""
    return bounded_name(name, DNS1123_SUBDOMAIN_MAX, CONFIGMAP_SUFFIX)


def service_name(name: str) -> str:
    """The headless Service that gives the pods of a several-pod run their DNS names: a
    DNS-1035 label (a letter first: `ftj-` and the name)."""
    return dns_label(name, LABEL_VALUE_MAX, SERVICE_PREFIX)
