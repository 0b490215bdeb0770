"""Names and labels of a FineTuneJob's children: deterministic, and valid for every FineTuneJob name.

The API server accepts any DNS-1123 subdomain of up to 253 characters as a FineTuneJob name, but
a Job's name becomes the value of its pods' `job-name` label (at most 63 characters), and every
child carries the label `finetune.dev/job`. So a name that fits its limit is used as it is, and a
longer one keeps a prefix followed by `-` and 8 hex digits of the SHA-256 of the whole name: the
same on every pass, and different for two FineTuneJobs that share the prefix.

    run1                  -> Job run1, label finetune.dev/job=run1, ConfigMap run1-config
    <100-character name>  -> Job <first 54 characters>-<8 hex>, the same label value,
                             ConfigMap <100-character name>-config
"""

from __future__ import annotations

import hashlib

LABEL_VALUE_MAX = 63  # k8s.io/apimachinery validation.LabelValueMaxLength
DNS1123_SUBDOMAIN_MAX = 253  # validation.DNS1123SubdomainMaxLength
HASH_CHARS = 8
CONFIGMAP_SUFFIX = "-config"


def bounded_name(name: str, limit: int, suffix: str = "") -> str:
    """`name + suffix` when it has at most `limit` characters; otherwise a prefix of `name`, a
    dash, 8 hex digits of SHA-256(name) and `suffix`, exactly `limit` characters or fewer.

    For a DNS-1123 subdomain `name` (and a suffix of letters, digits and dashes) the result is a
    DNS-1123 subdomain too: the prefix never ends in `-` or `.`.
    """
    if len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    keep = limit - len(suffix) - HASH_CHARS - 1
    return f"{name[:keep].rstrip('-.')}-{digest}{suffix}"


def job_name(name: str) -> str:
    """The batch/v1 Job of FineTuneJob `name` (at most 63 characters: it is a label value)."""
    return bounded_name(name, LABEL_VALUE_MAX)


def job_label(name: str) -> str:
    """The value of the `finetune.dev/job` label on the children of FineTuneJob `name`: its
    Job's name, so `kubectl get pods -l finetune.dev/job=<Job name>` lists the trainer pods."""
    return job_name(name)


def configmap_name(name: str) -> str:
    """The ConfigMap holding the run config of FineTuneJob `name`."""
    return bounded_name(name, DNS1123_SUBDOMAIN_MAX, CONFIGMAP_SUFFIX)
