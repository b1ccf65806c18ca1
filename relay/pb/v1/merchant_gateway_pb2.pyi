import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from relay.pb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSessionRequest(_message.Message):
    __slots__ = ("fields",)
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.RepeatedCompositeFieldContainer[_common_pb2.FieldSpec]
    def __init__(self, fields: _Optional[_Iterable[_Union[_common_pb2.FieldSpec, _Mapping]]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("capture_context", "jti", "expires_at")
    CAPTURE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    capture_context: str
    jti: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, capture_context: _Optional[str] = ..., jti: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("request_id", "card_ref", "fields")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_ref: str
    fields: _containers.RepeatedCompositeFieldContainer[_common_pb2.FieldSpec]
    def __init__(self, request_id: _Optional[str] = ..., card_ref: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[_common_pb2.FieldSpec, _Mapping]]] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class TokenResult(_message.Message):
    __slots__ = ("request_id", "card_ref", "token", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_ref: str
    token: TransientToken
    error: _common_pb2.Error
    def __init__(self, request_id: _Optional[str] = ..., card_ref: _Optional[str] = ..., token: _Optional[_Union[TransientToken, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class TransientToken(_message.Message):
    __slots__ = ("transient_token", "jti", "expires_at", "masked_pan", "bin", "card_type", "receipt")
    TRANSIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MASKED_PAN_FIELD_NUMBER: _ClassVar[int]
    BIN_FIELD_NUMBER: _ClassVar[int]
    CARD_TYPE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    transient_token: str
    jti: str
    expires_at: _timestamp_pb2.Timestamp
    masked_pan: str
    bin: str
    card_type: str
    receipt: str
    def __init__(self, transient_token: _Optional[str] = ..., jti: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., masked_pan: _Optional[str] = ..., bin: _Optional[str] = ..., card_type: _Optional[str] = ..., receipt: _Optional[str] = ...) -> None: ...
