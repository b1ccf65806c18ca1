import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from relay.pb.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PciTokenizeRequest(_message.Message):
    __slots__ = ("request_id", "capture_context", "card_ref", "timeout", "withdraw", "repeat", "app_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    capture_context: str
    card_ref: str
    timeout: _duration_pb2.Duration
    withdraw: bool
    repeat: bool
    app_id: str
    def __init__(self, request_id: _Optional[str] = ..., capture_context: _Optional[str] = ..., card_ref: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., withdraw: _Optional[bool] = ..., repeat: _Optional[bool] = ..., app_id: _Optional[str] = ...) -> None: ...

class PciTokenizeResult(_message.Message):
    __slots__ = ("request_id", "token", "error", "app_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: PciTransientToken
    error: _common_pb2.Error
    app_id: str
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[PciTransientToken, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., app_id: _Optional[str] = ...) -> None: ...

class PciTransientToken(_message.Message):
    __slots__ = ("transient_token", "jti", "expires_at", "receipt")
    TRANSIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    transient_token: str
    jti: str
    expires_at: _timestamp_pb2.Timestamp
    receipt: str
    def __init__(self, transient_token: _Optional[str] = ..., jti: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., receipt: _Optional[str] = ...) -> None: ...
