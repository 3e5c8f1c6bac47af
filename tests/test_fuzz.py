"""Bounded fuzzing of the request path with hypothesis: hostile bytes and messages get documented errors only.

- guard/preprocess.py, fed random bytes and mutated PNG/JPEG/DICOM files under
  each media type, raises nothing but InvalidImageError (and what it returns is
  a finite float32 [3, S, S] array).
- server/service.py's request_from_pb, fed random AskRequest/ScoreRequest
  messages (and random wire bytes parsed as them), raises nothing but
  InvalidImageError / InvalidRequestError.
- A real gRPC server (FakeGuard, so the real image decoding runs) answers a
  few hundred random messages and random wire bytes with OK or
  INVALID_ARGUMENT only, and keeps serving.

The examples are derandomized, so `make test` is repeatable; a failure prints
the smallest input that reproduces it.
"""

from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from guard.errors import InvalidImageError, InvalidRequestError
from guard.preprocess import MEDIA_TYPES, ImageLimits, PreprocessConfig, preprocess
from guard.types import DecodeConfig, VqaRequest
from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from server.service import request_from_pb
from tests.fakes import FakeGuard, serve_in_thread

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


# Small limits keep a mutated header that claims a huge image from decoding for seconds; the checks are the same.
LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=1024 * 1024)
CONFIG = PreprocessConfig(image_size=32, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def _seed_files() -> dict[str, list[bytes]]:
    """Small valid files of each media type, for mutation."""
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (24, 20), dtype=np.uint8)
    rgb = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)

    def encode(array, fmt, **kw):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, **kw)
        return buf.getvalue()

    dicoms = []
    for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "MR_small_RLE.dcm"):
        with open(get_testdata_file(name), "rb") as f:
            dicoms.append(f.read())
    return {
        "image/png": [encode(gray, "PNG"), encode(rgb, "PNG"), encode(rgb, "PNG", optimize=True)],
        "image/jpeg": [encode(gray, "JPEG"), encode(rgb, "JPEG", quality=50), encode(rgb, "JPEG", progressive=True)],
        "application/dicom": dicoms,
    }


SEEDS = _seed_files()


@st.composite
def mutated(draw, media_type: str) -> bytes:
    """A valid file of `media_type` with random bytes overwritten, inserted, deleted, or cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS[media_type])))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(("overwrite", "insert", "delete", "truncate")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


def image_bytes() -> st.SearchStrategy[tuple[bytes, str]]:
    """(bytes, media type): pure noise, noise after the right signature, or a mutated valid file."""
    signatures = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "application/dicom": bytes(128) + b"DICM"}
    return st.sampled_from(MEDIA_TYPES).flatmap(lambda m: st.tuples(
        st.one_of(st.binary(max_size=2048), st.binary(max_size=2048).map(lambda b: signatures[m] + b), mutated(m)),
        st.just(m),
    ))


def _check_pixels(pixels: np.ndarray) -> None:
    assert pixels.dtype == np.float32 and pixels.shape == (3, CONFIG.image_size, CONFIG.image_size)
    assert np.isfinite(pixels).all()


@pytest.mark.timeout(240)
@fuzz(1500)
@given(image_bytes())
def test_preprocess_raises_only_invalid_image_error_on_hostile_bytes(case):
    data, media_type = case
    try:
        pixels = preprocess(data, media_type, CONFIG, LIMITS)
    except InvalidImageError:
        return
    _check_pixels(pixels)


@pytest.mark.timeout(120)
@fuzz(300)
@given(st.binary(max_size=512), st.sampled_from(MEDIA_TYPES))
def test_preprocess_of_any_bytes_under_every_media_type_is_pixels_or_invalid_image_error(data, media_type):
    try:
        pixels = preprocess(data, media_type, CONFIG, LIMITS)
    except InvalidImageError:
        return
    _check_pixels(pixels)


# --- request messages ---------------------------------------------------------------------------

TEXT = st.one_of(st.text(max_size=64), st.sampled_from(("", " ", "\n\t", "Is there a pleural effusion?")),
                 st.text(min_size=4000, max_size=4100))
MEDIA = st.one_of(st.sampled_from((*MEDIA_TYPES, "IMAGE/PNG; q=1", "image/gif", "", "application/dicom ")),
                  st.text(max_size=32))
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from((0.0, -1.0, 2.0, 5.0, 5.000001)))


@st.composite
def generation(draw) -> pb.GenerationSettings:
    msg = pb.GenerationSettings()
    if draw(st.booleans()):
        msg.max_new_tokens = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)))  # uint32
    if draw(st.booleans()):
        msg.temperature = draw(NUMBER)
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))  # uint64
    return msg


@st.composite
def request_messages(draw):
    valid = st.sampled_from([(data, m) for m, files in SEEDS.items() for data in files])
    image, media_type = draw(st.one_of(valid, image_bytes(), st.tuples(st.binary(max_size=64), MEDIA)))
    fields = dict(image=image, media_type=media_type, question=draw(TEXT), request_id=draw(st.text(max_size=40)))
    if draw(st.booleans()):
        return pb.ScoreRequest(**fields, answer=draw(TEXT))
    msg = pb.AskRequest(**fields)
    if draw(st.booleans()):
        msg.generation.CopyFrom(draw(generation()))
    return msg


def _wire_bytes():
    """Random bytes, or a valid message's bytes with some flipped: what a broken client could send."""
    return st.one_of(st.binary(max_size=256),
                     st.tuples(request_messages(), st.binary(min_size=1, max_size=8), st.integers(0, 64)).map(
                         lambda t: _splice(t[0].SerializeToString(), t[1], t[2])))


def _splice(data: bytes, chunk: bytes, at: int) -> bytes:
    at = min(at, len(data))
    return data[:at] + chunk + data[at + len(chunk):]


@pytest.mark.timeout(120)
@fuzz(1000)
@given(request_messages())
def test_request_from_pb_raises_only_typed_request_errors(msg):
    try:
        req = request_from_pb(msg, DecodeConfig(), ServerConfig())
    except (InvalidImageError, InvalidRequestError):
        return
    assert isinstance(req, VqaRequest) and req.media_type in MEDIA_TYPES
    assert req.question.strip() and req.request_id
    assert req.decode.max_new_tokens >= 1 and math.isfinite(req.decode.temperature)


@pytest.mark.timeout(120)
@fuzz(500)
@given(_wire_bytes(), st.sampled_from((pb.AskRequest, pb.ScoreRequest)))
def test_random_wire_bytes_fail_to_parse_or_give_typed_request_errors(data, message_type):
    from google.protobuf.message import DecodeError

    try:
        msg = message_type.FromString(data)
    except DecodeError:
        return  # the server turns this into INVALID_ARGUMENT (checked through a real server below)
    try:
        request_from_pb(msg, DecodeConfig(), ServerConfig())
    except (InvalidImageError, InvalidRequestError):
        pass


# --- through a real server ----------------------------------------------------------------------

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def channel():
    with serve_in_thread(FakeGuard()) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def _code(fn, *args) -> grpc.StatusCode:
    try:
        result = fn(*args, timeout=10)
        if not hasattr(result, "SerializeToString"):  # a stream: read it to the end
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _assert_still_serving(channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    good = pb.AskRequest(image=SEEDS["image/png"][0], media_type="image/png", question="Any effusion?")
    assert _code(pb_grpc.MedHallGuardStub(channel).Ask, good) is grpc.StatusCode.OK


@pytest.mark.timeout(240)
def test_server_answers_random_messages_with_ok_or_invalid_argument_only(channel):
    stub = pb_grpc.MedHallGuardStub(channel)
    seen: list[grpc.StatusCode] = []

    @fuzz(300)
    @given(request_messages(), st.booleans())
    def send(msg, stream):
        if isinstance(msg, pb.ScoreRequest):
            code = _code(stub.Score, msg)
        else:
            code = _code(stub.AskStream if stream else stub.Ask, msg)
        seen.append(code)
        assert code in ALLOWED, f"{code} for {msg!r:.300}"

    send()
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= set(seen)  # both paths were exercised
    _assert_still_serving(channel)


@pytest.mark.timeout(120)
def test_server_answers_random_wire_bytes_with_ok_or_invalid_argument_only(channel):
    methods = {name: channel.unary_unary(f"/medhallguard.v1.MedHallGuard/{name}") for name in ("Ask", "Score")}
    methods["AskStream"] = channel.unary_stream("/medhallguard.v1.MedHallGuard/AskStream")
    seen: list[grpc.StatusCode] = []

    @fuzz(200)
    @given(_wire_bytes(), st.sampled_from(sorted(methods)))
    def send(data, method):
        code = _code(methods[method], data)
        seen.append(code)
        assert code in ALLOWED, f"{code} for {method} with {data!r:.300}"

    send()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    _assert_still_serving(channel)


# --- regressions the fuzzing found --------------------------------------------------------------


def _ct_small_with(**meta) -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in meta.items():
        setattr(ds.file_meta, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def test_dicom_whose_transfer_syntax_uid_is_no_transfer_syntax_is_invalid_image():
    with pytest.raises(InvalidImageError, match="DICOM"):
        preprocess(_ct_small_with(TransferSyntaxUID="1.2.3.4"), "application/dicom", CONFIG, LIMITS)


def test_dicom_with_a_one_byte_group_length_is_invalid_image():
    data = SEEDS["application/dicom"][0]
    at = data.index(b"\x02\x00\x00\x00", 132)  # (0002,0000) File Meta Information Group Length
    broken = data[: at + 4] + b"UL\x01\x00\x00" + data[at + 12 :]  # its value cut to 1 byte
    with pytest.raises(InvalidImageError):
        preprocess(broken, "application/dicom", CONFIG, LIMITS)


def test_malformed_protobuf_is_invalid_argument_not_unknown(channel):
    ask = channel.unary_unary("/medhallguard.v1.MedHallGuard/Ask")
    with pytest.raises(grpc.RpcError) as info:
        ask(b"\xff\xff\xff\x01garbage", timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in info.value.details()
