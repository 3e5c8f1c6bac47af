from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ANSWER: _ClassVar[Verdict]
    VERDICT_ANSWER_WITH_WARNING: _ClassVar[Verdict]
    VERDICT_ABSTAIN: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
VERDICT_ANSWER: Verdict
VERDICT_ANSWER_WITH_WARNING: Verdict
VERDICT_ABSTAIN: Verdict

class GenerationSettings(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("image", "media_type", "question", "generation", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    media_type: str
    question: str
    generation: GenerationSettings
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., media_type: _Optional[str] = ..., question: _Optional[str] = ..., generation: _Optional[_Union[GenerationSettings, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("image", "media_type", "question", "answer", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    media_type: str
    question: str
    answer: str
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., media_type: _Optional[str] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level")
    CLINICAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLINICAL_RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    RISK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    clinical_accuracy: float
    clinical_relevance: float
    detail_level: float
    risk_level: float
    def __init__(self, clinical_accuracy: _Optional[float] = ..., clinical_relevance: _Optional[float] = ..., detail_level: _Optional[float] = ..., risk_level: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "guard_ms", "total_ms")
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    VISION_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    GUARD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    guard_ms: float
    total_ms: float
    def __init__(self, preprocess_ms: _Optional[float] = ..., vision_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., guard_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answer", "verdict", "p_hallucination", "premise_risk", "scores", "heads_trained", "reasons", "model_id", "model_checksum", "backend", "timings", "request_id", "num_tokens", "stop_reason")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    P_HALLUCINATION_FIELD_NUMBER: _ClassVar[int]
    PREMISE_RISK_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    HEADS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    answer: str
    verdict: Verdict
    p_hallucination: float
    premise_risk: float
    scores: Scores
    heads_trained: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    model_id: str
    model_checksum: str
    backend: str
    timings: Timings
    request_id: str
    num_tokens: int
    stop_reason: str
    def __init__(self, answer: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., p_hallucination: _Optional[float] = ..., premise_risk: _Optional[float] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., heads_trained: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., model_id: _Optional[str] = ..., model_checksum: _Optional[str] = ..., backend: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: str
    final: AskResponse
    def __init__(self, delta: _Optional[str] = ..., final: _Optional[_Union[AskResponse, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "family", "checksum", "backend", "image_size", "num_image_tokens", "heads_trained", "verified", "thresholds", "server_version", "max_message_bytes", "max_pixels", "max_image_bytes", "max_question_chars", "default_generation", "max_answer_chars")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEADS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_CHARS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    family: str
    checksum: str
    backend: str
    image_size: int
    num_image_tokens: int
    heads_trained: bool
    verified: bool
    thresholds: _containers.ScalarMap[str, float]
    server_version: str
    max_message_bytes: int
    max_pixels: int
    max_image_bytes: int
    max_question_chars: int
    default_generation: GenerationSettings
    max_answer_chars: int
    def __init__(self, model_id: _Optional[str] = ..., family: _Optional[str] = ..., checksum: _Optional[str] = ..., backend: _Optional[str] = ..., image_size: _Optional[int] = ..., num_image_tokens: _Optional[int] = ..., heads_trained: _Optional[bool] = ..., verified: _Optional[bool] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., server_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_question_chars: _Optional[int] = ..., default_generation: _Optional[_Union[GenerationSettings, _Mapping]] = ..., max_answer_chars: _Optional[int] = ...) -> None: ...
