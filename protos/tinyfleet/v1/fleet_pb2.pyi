from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("description", "media_type", "public_key", "sequence", "signature", "enrollment_token")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    description: bytes
    media_type: str
    public_key: bytes
    sequence: int
    signature: bytes
    enrollment_token: str
    def __init__(self, description: _Optional[bytes] = ..., media_type: _Optional[str] = ..., public_key: _Optional[bytes] = ..., sequence: _Optional[int] = ..., signature: _Optional[bytes] = ..., enrollment_token: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "node_id", "created")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    node_id: int
    created: bool
    def __init__(self, device_id: _Optional[str] = ..., node_id: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class AgentFrame(_message.Message):
    __slots__ = ("hello", "reply", "heartbeat", "pong")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    reply: Reply
    heartbeat: Heartbeat
    pong: Pong
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("device_id", "agent_version", "handlers", "signature")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    agent_version: str
    handlers: _containers.RepeatedScalarFieldContainer[str]
    signature: bytes
    def __init__(self, device_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., handlers: _Optional[_Iterable[str]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("message_id", "flower_message", "compute_seconds")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FLOWER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    flower_message: bytes
    compute_seconds: float
    def __init__(self, message_id: _Optional[str] = ..., flower_message: _Optional[bytes] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class CoordinatorFrame(_message.Message):
    __slots__ = ("welcome", "task", "ping", "shutdown", "challenge")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: Task
    ping: Ping
    shutdown: Shutdown
    challenge: Challenge
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., challenge: _Optional[_Union[Challenge, _Mapping]] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "max_message_bytes", "server_time")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    heartbeat_interval_s: float
    max_message_bytes: int
    server_time: float
    def __init__(self, node_id: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., server_time: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("message_id", "flower_message", "deadline_s")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FLOWER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    flower_message: bytes
    deadline_s: float
    def __init__(self, message_id: _Optional[str] = ..., flower_message: _Optional[bytes] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason", "reconnect_after_s")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    reason: str
    reconnect_after_s: float
    def __init__(self, reason: _Optional[str] = ..., reconnect_after_s: _Optional[float] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("sha256", "offset", "chunk_size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    chunk_size: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_toml",)
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    spec_toml: str
    def __init__(self, spec_toml: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "state", "reason", "rounds_total", "rounds_done", "created_at", "finished_at", "rounds_json", "strategy")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_JSON_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    reason: str
    rounds_total: int
    rounds_done: int
    created_at: float
    finished_at: float
    rounds_json: str
    strategy: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., rounds_total: _Optional[int] = ..., rounds_done: _Optional[int] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., rounds_json: _Optional[str] = ..., strategy: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "node_id", "online", "last_seen", "registered_at", "revoked", "revoked_reason", "agent_version", "rtt_ms", "rtt_max_ms", "handlers")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    node_id: int
    online: bool
    last_seen: float
    registered_at: float
    revoked: bool
    revoked_reason: str
    agent_version: str
    rtt_ms: float
    rtt_max_ms: float
    handlers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., node_id: _Optional[int] = ..., online: _Optional[bool] = ..., last_seen: _Optional[float] = ..., registered_at: _Optional[float] = ..., revoked: _Optional[bool] = ..., revoked_reason: _Optional[str] = ..., agent_version: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., rtt_max_ms: _Optional[float] = ..., handlers: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateEnrollmentRequest(_message.Message):
    __slots__ = ("uses", "ttl_s", "label")
    USES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    uses: int
    ttl_s: float
    label: str
    def __init__(self, uses: _Optional[int] = ..., ttl_s: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class CreateEnrollmentResponse(_message.Message):
    __slots__ = ("token", "enrollment")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    token: str
    enrollment: EnrollmentInfo
    def __init__(self, token: _Optional[str] = ..., enrollment: _Optional[_Union[EnrollmentInfo, _Mapping]] = ...) -> None: ...

class EnrollmentInfo(_message.Message):
    __slots__ = ("enrollment_id", "label", "uses_total", "uses_left", "created_at", "expires_at", "revoked")
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    USES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    USES_LEFT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    label: str
    uses_total: int
    uses_left: int
    created_at: float
    expires_at: float
    revoked: bool
    def __init__(self, enrollment_id: _Optional[str] = ..., label: _Optional[str] = ..., uses_total: _Optional[int] = ..., uses_left: _Optional[int] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., revoked: _Optional[bool] = ...) -> None: ...

class ListEnrollmentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnrollmentsResponse(_message.Message):
    __slots__ = ("enrollments",)
    ENROLLMENTS_FIELD_NUMBER: _ClassVar[int]
    enrollments: _containers.RepeatedCompositeFieldContainer[EnrollmentInfo]
    def __init__(self, enrollments: _Optional[_Iterable[_Union[EnrollmentInfo, _Mapping]]] = ...) -> None: ...

class RevokeEnrollmentRequest(_message.Message):
    __slots__ = ("enrollment_id",)
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    def __init__(self, enrollment_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id", "reason")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    reason: str
    def __init__(self, device_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
