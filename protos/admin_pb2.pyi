from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetVariantRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class SetVariantRequest(_message.Message):
    __slots__ = ("model_name", "variant", "pin")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    variant: str
    pin: bool
    def __init__(self, model_name: _Optional[str] = ..., variant: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class VariantState(_message.Message):
    __slots__ = ("model_name", "default_variant", "pinned", "variants", "window_agreement", "window_samples", "rollbacks", "last_rollback_reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VARIANT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROLLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    default_variant: str
    pinned: bool
    variants: _containers.RepeatedScalarFieldContainer[str]
    window_agreement: float
    window_samples: int
    rollbacks: int
    last_rollback_reason: str
    def __init__(self, model_name: _Optional[str] = ..., default_variant: _Optional[str] = ..., pinned: _Optional[bool] = ..., variants: _Optional[_Iterable[str]] = ..., window_agreement: _Optional[float] = ..., window_samples: _Optional[int] = ..., rollbacks: _Optional[int] = ..., last_rollback_reason: _Optional[str] = ...) -> None: ...
