"""Classification of what the libraries raise: the user's input (exit 65) or a transient outage
(retryable), from their own exception types, HTTP statuses and errno, across cause chains."""

from __future__ import annotations

import errno
import itertools
from typing import Any

import aiohttp
import botocore.exceptions as boto
import httpx2
import pytest
import requests
from finetune_trainer.errors import InvalidInputError, TransientError, classify
from huggingface_hub import errors as hub
from hypothesis import given
from hypothesis import strategies as st


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://hub.example/api"))


def _client_error(code: str, status: int) -> boto.ClientError:
    body: Any = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return boto.ClientError(body, "GetObject")


def transient() -> list[BaseException]:
    return [
        httpx2.ConnectError("refused"),
        httpx2.ReadTimeout("timed out"),
        hub.HfHubHTTPError("503 Server Error", response=_response(503)),
        hub.HfHubHTTPError("429 Too Many Requests", response=_response(429)),
        boto.EndpointConnectionError(endpoint_url="http://s3.example"),
        boto.ReadTimeoutError(endpoint_url="http://s3.example"),
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        aiohttp.ServerDisconnectedError(),
        requests.ConnectionError("reset"),
        OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs's translation of a 503
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        TimeoutError("timed out"),
    ]


def user_input() -> list[BaseException]:
    return [
        hub.RepositoryNotFoundError("404 not found", response=_response(404)),
        hub.GatedRepoError("403 gated", response=_response(403)),
        hub.HfHubHTTPError("401 Unauthorized", response=_response(401)),
        hub.HFValidationError("Repo id must be in the form 'repo_name'"),
        hub.OfflineModeIsEnabled("offline"),
        boto.NoCredentialsError(),
        boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        _client_error("AccessDenied", 403),
        _client_error("NoSuchBucket", 404),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.jsonl"),
        PermissionError(errno.EACCES, "Permission denied", "/data/x.jsonl"),
        OSError(errno.ENAMETOOLONG, "File name too long"),
        IsADirectoryError(errno.EISDIR, "Is a directory"),
    ]


def bugs() -> list[BaseException]:
    return [KeyError("x"), TypeError("bad"), ValueError("nope"), RuntimeError("boom"), OSError("?")]


def _chain(*links: BaseException) -> BaseException:
    """links[0] raised from links[1] raised from ...: the outermost first."""
    for outer, inner in itertools.pairwise(links):
        outer.__cause__ = inner
    return links[0]


N_TRANSIENT, N_INPUT, N_BUGS = len(transient()), len(user_input()), len(bugs())


@pytest.mark.parametrize("index", range(N_TRANSIENT))
def test_outages_are_transient(index: int) -> None:
    found = classify(transient()[index], "model.source: hf://a/b")
    assert isinstance(found, TransientError)
    assert str(found).startswith("model.source: hf://a/b: ") and "transient" in str(found)


@pytest.mark.parametrize("index", range(N_INPUT))
def test_user_problems_are_input_errors(index: int) -> None:
    found = classify(user_input()[index], "dataset.source")
    assert isinstance(found, InvalidInputError)
    assert str(found).startswith("dataset.source: ") and "\n" not in str(found)


@pytest.mark.parametrize("index", range(N_BUGS))
def test_anything_else_is_a_bug(index: int) -> None:
    assert classify(bugs()[index], "x") is None


def test_the_hub_cache_miss_raised_from_an_outage_is_transient() -> None:
    """snapshot_download raises LocalEntryNotFoundError (a FileNotFoundError) from the error
    that kept it from the Hub: the cause decides."""

    def miss() -> BaseException:
        return hub.LocalEntryNotFoundError("cannot find the requested files in the local cache")

    assert isinstance(classify(_chain(miss(), httpx2.ConnectError("refused")), "m"), TransientError)
    found = classify(_chain(miss(), hub.OfflineModeIsEnabled("offline")), "m")
    assert isinstance(found, InvalidInputError) and "HF_HUB_OFFLINE" in str(found)


def test_s3fs_translations_are_classified_by_the_botocore_cause() -> None:
    """s3fs turns a ClientError into a FileNotFoundError/PermissionError/OSError(EIO) with the
    ClientError as its cause."""
    unknown = OSError(errno.EIO, "We encountered an internal error")
    assert isinstance(classify(_chain(unknown, _client_error("Weird", 502)), "s3"), TransientError)
    missing = FileNotFoundError("The specified key does not exist.")
    found = classify(_chain(missing, _client_error("NoSuchKey", 404)), "s3://b/k")
    assert isinstance(found, InvalidInputError) and str(found) == "s3://b/k: not found"


not_transient = st.one_of(
    st.tuples(st.just("input"), st.integers(0, N_INPUT - 1)),
    st.tuples(st.just("bug"), st.integers(0, N_BUGS - 1)),
)


def _make(kind: str, index: int) -> BaseException:
    return {"input": user_input, "bug": bugs, "transient": transient}[kind]()[index]


@given(
    outer=not_transient,
    middle=st.integers(0, N_TRANSIENT - 1),
    inner=st.lists(not_transient, max_size=3),
)
def test_a_transient_link_anywhere_in_the_chain_wins(
    outer: tuple[str, int], middle: int, inner: list[tuple[str, int]]
) -> None:
    links = [_make(*outer), _make("transient", middle), *(_make(*i) for i in inner)]
    assert isinstance(classify(_chain(*links), "w"), TransientError)


@given(outer=st.integers(0, N_BUGS - 1), cause=st.integers(0, N_INPUT - 1))
def test_an_input_cause_makes_an_input_error(outer: int, cause: int) -> None:
    found = classify(_chain(_make("bug", outer), _make("input", cause)), "w")
    assert isinstance(found, InvalidInputError)


def test_an_already_classified_error_is_kept() -> None:
    mine = InvalidInputError("dataset.source: x: not found")
    assert classify(mine, "other") is mine
