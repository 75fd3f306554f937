from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_POLICY_UNSPECIFIED: _ClassVar[SyncPolicy]
    SYNC_POLICY_FSYNC: _ClassVar[SyncPolicy]
    SYNC_POLICY_INTERVAL: _ClassVar[SyncPolicy]
    SYNC_POLICY_NONE: _ClassVar[SyncPolicy]

class ExpiredAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPIRED_ACTION_UNSPECIFIED: _ClassVar[ExpiredAction]
    EXPIRED_ACTION_DEAD_LETTER: _ClassVar[ExpiredAction]
    EXPIRED_ACTION_DROP: _ClassVar[ExpiredAction]

class ExtendOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTEND_OUTCOME_UNSPECIFIED: _ClassVar[ExtendOutcome]
    EXTEND_OUTCOME_EXTENDED: _ClassVar[ExtendOutcome]
    EXTEND_OUTCOME_EXPIRED: _ClassVar[ExtendOutcome]
    EXTEND_OUTCOME_NOT_LEASED: _ClassVar[ExtendOutcome]
SYNC_POLICY_UNSPECIFIED: SyncPolicy
SYNC_POLICY_FSYNC: SyncPolicy
SYNC_POLICY_INTERVAL: SyncPolicy
SYNC_POLICY_NONE: SyncPolicy
EXPIRED_ACTION_UNSPECIFIED: ExpiredAction
EXPIRED_ACTION_DEAD_LETTER: ExpiredAction
EXPIRED_ACTION_DROP: ExpiredAction
EXTEND_OUTCOME_UNSPECIFIED: ExtendOutcome
EXTEND_OUTCOME_EXTENDED: ExtendOutcome
EXTEND_OUTCOME_EXPIRED: ExtendOutcome
EXTEND_OUTCOME_NOT_LEASED: ExtendOutcome

class QueueSettings(_message.Message):
    __slots__ = ("lanes", "lane_weights", "strict_priority", "default_lane", "lease_timeout_ms", "max_attempts", "dead_letter", "dedupe_window_ms", "message_size_max", "sync_policy", "sync_interval_ms", "max_messages", "max_bytes", "lane_admission", "max_publish_rate", "max_publish_byte_rate", "message_ttl_ms", "expired_action", "max_delivery_rate", "replicas")
    LANES_FIELD_NUMBER: _ClassVar[int]
    LANE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STRICT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LANE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    DEDUPE_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_SIZE_MAX_FIELD_NUMBER: _ClassVar[int]
    SYNC_POLICY_FIELD_NUMBER: _ClassVar[int]
    SYNC_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    LANE_ADMISSION_FIELD_NUMBER: _ClassVar[int]
    MAX_PUBLISH_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_PUBLISH_BYTE_RATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_ACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_DELIVERY_RATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    lanes: _containers.RepeatedScalarFieldContainer[str]
    lane_weights: _containers.RepeatedScalarFieldContainer[int]
    strict_priority: bool
    default_lane: int
    lease_timeout_ms: int
    max_attempts: int
    dead_letter: bool
    dedupe_window_ms: int
    message_size_max: int
    sync_policy: SyncPolicy
    sync_interval_ms: int
    max_messages: int
    max_bytes: int
    lane_admission: _containers.RepeatedScalarFieldContainer[float]
    max_publish_rate: int
    max_publish_byte_rate: int
    message_ttl_ms: int
    expired_action: ExpiredAction
    max_delivery_rate: int
    replicas: int
    def __init__(self, lanes: _Optional[_Iterable[str]] = ..., lane_weights: _Optional[_Iterable[int]] = ..., strict_priority: _Optional[bool] = ..., default_lane: _Optional[int] = ..., lease_timeout_ms: _Optional[int] = ..., max_attempts: _Optional[int] = ..., dead_letter: _Optional[bool] = ..., dedupe_window_ms: _Optional[int] = ..., message_size_max: _Optional[int] = ..., sync_policy: _Optional[_Union[SyncPolicy, str]] = ..., sync_interval_ms: _Optional[int] = ..., max_messages: _Optional[int] = ..., max_bytes: _Optional[int] = ..., lane_admission: _Optional[_Iterable[float]] = ..., max_publish_rate: _Optional[int] = ..., max_publish_byte_rate: _Optional[int] = ..., message_ttl_ms: _Optional[int] = ..., expired_action: _Optional[_Union[ExpiredAction, str]] = ..., max_delivery_rate: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class CreateQueueRequest(_message.Message):
    __slots__ = ("name", "settings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    settings: QueueSettings
    def __init__(self, name: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ...) -> None: ...

class UpdateQueueRequest(_message.Message):
    __slots__ = ("name", "settings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    settings: QueueSettings
    def __init__(self, name: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ...) -> None: ...

class RedriveRequest(_message.Message):
    __slots__ = ("name", "max_messages", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_messages: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., max_messages: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RedriveResponse(_message.Message):
    __slots__ = ("moved", "already_moved", "skipped_leased")
    MOVED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_MOVED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LEASED_FIELD_NUMBER: _ClassVar[int]
    moved: int
    already_moved: int
    skipped_leased: int
    def __init__(self, moved: _Optional[int] = ..., already_moved: _Optional[int] = ..., skipped_leased: _Optional[int] = ...) -> None: ...

class GetQueueRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class QueueInfo(_message.Message):
    __slots__ = ("name", "settings", "dead_letter_queue", "lane_depths", "depth", "in_flight", "consumers", "created_at_ms", "damaged", "opening")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_QUEUE_FIELD_NUMBER: _ClassVar[int]
    LANE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    OPENING_FIELD_NUMBER: _ClassVar[int]
    name: str
    settings: QueueSettings
    dead_letter_queue: str
    lane_depths: _containers.RepeatedScalarFieldContainer[int]
    depth: int
    in_flight: int
    consumers: int
    created_at_ms: int
    damaged: str
    opening: bool
    def __init__(self, name: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ..., dead_letter_queue: _Optional[str] = ..., lane_depths: _Optional[_Iterable[int]] = ..., depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., consumers: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., damaged: _Optional[str] = ..., opening: _Optional[bool] = ...) -> None: ...

class ListQueuesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListQueuesResponse(_message.Message):
    __slots__ = ("queues",)
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueInfo]
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueInfo, _Mapping]]] = ...) -> None: ...

class DeleteQueueRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteQueueResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PurgeQueueRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PurgeQueueResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("payload", "headers", "idempotency_key", "lane", "delay_ms", "ttl_ms")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    headers: _containers.ScalarMap[str, str]
    idempotency_key: str
    lane: int
    delay_ms: int
    ttl_ms: int
    def __init__(self, payload: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., lane: _Optional[int] = ..., delay_ms: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("queue", "message")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    message: Message
    def __init__(self, queue: _Optional[str] = ..., message: _Optional[_Union[Message, _Mapping]] = ...) -> None: ...

class MessageId(_message.Message):
    __slots__ = ("lane", "offset")
    LANE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    lane: int
    offset: int
    def __init__(self, lane: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("id", "duplicate", "queue", "lane")
    ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    id: MessageId
    duplicate: bool
    queue: Saturation
    lane: Saturation
    def __init__(self, id: _Optional[_Union[MessageId, _Mapping]] = ..., duplicate: _Optional[bool] = ..., queue: _Optional[_Union[Saturation, _Mapping]] = ..., lane: _Optional[_Union[Saturation, _Mapping]] = ...) -> None: ...

class Saturation(_message.Message):
    __slots__ = ("depth", "bytes", "saturation", "oldest_age_ms", "drain_estimate_ms", "ack_rate", "publish_rate")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_ESTIMATE_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_RATE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_RATE_FIELD_NUMBER: _ClassVar[int]
    depth: int
    bytes: int
    saturation: float
    oldest_age_ms: int
    drain_estimate_ms: int
    ack_rate: float
    publish_rate: float
    def __init__(self, depth: _Optional[int] = ..., bytes: _Optional[int] = ..., saturation: _Optional[float] = ..., oldest_age_ms: _Optional[int] = ..., drain_estimate_ms: _Optional[int] = ..., ack_rate: _Optional[float] = ..., publish_rate: _Optional[float] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("receipt",)
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    receipt: Receipt
    def __init__(self, receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class PublishBatchRequest(_message.Message):
    __slots__ = ("queue", "messages")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    queue: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, queue: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class PublishBatchResponse(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ...) -> None: ...

class PublishStreamRequest(_message.Message):
    __slots__ = ("sequence", "queue", "messages")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    queue: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, sequence: _Optional[int] = ..., queue: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class PublishStreamResponse(_message.Message):
    __slots__ = ("sequence", "receipts", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    error: PublishError
    def __init__(self, sequence: _Optional[int] = ..., receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ..., error: _Optional[_Union[PublishError, _Mapping]] = ...) -> None: ...

class PublishError(_message.Message):
    __slots__ = ("code", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("queue", "interval_ms")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    interval_ms: int
    def __init__(self, queue: _Optional[str] = ..., interval_ms: _Optional[int] = ...) -> None: ...

class LaneStats(_message.Message):
    __slots__ = ("name", "saturation", "admission", "in_flight", "storage_failed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FAILED_FIELD_NUMBER: _ClassVar[int]
    name: str
    saturation: Saturation
    admission: float
    in_flight: int
    storage_failed: bool
    def __init__(self, name: _Optional[str] = ..., saturation: _Optional[_Union[Saturation, _Mapping]] = ..., admission: _Optional[float] = ..., in_flight: _Optional[int] = ..., storage_failed: _Optional[bool] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("name", "saturation", "lanes", "in_flight", "consumers", "credit", "max_messages", "max_bytes", "refused_queue_full", "refused_disk_full", "refused_publish_rate", "throttled_calls", "throttled_ms", "damaged", "opening", "expired_dead_lettered", "expired_dropped", "paced", "paced_ms", "paced_held_back")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_QUEUE_FULL_FIELD_NUMBER: _ClassVar[int]
    REFUSED_DISK_FULL_FIELD_NUMBER: _ClassVar[int]
    REFUSED_PUBLISH_RATE_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_CALLS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_MS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    OPENING_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PACED_FIELD_NUMBER: _ClassVar[int]
    PACED_MS_FIELD_NUMBER: _ClassVar[int]
    PACED_HELD_BACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    saturation: Saturation
    lanes: _containers.RepeatedCompositeFieldContainer[LaneStats]
    in_flight: int
    consumers: int
    credit: int
    max_messages: int
    max_bytes: int
    refused_queue_full: int
    refused_disk_full: int
    refused_publish_rate: int
    throttled_calls: int
    throttled_ms: int
    damaged: str
    opening: bool
    expired_dead_lettered: int
    expired_dropped: int
    paced: bool
    paced_ms: int
    paced_held_back: int
    def __init__(self, name: _Optional[str] = ..., saturation: _Optional[_Union[Saturation, _Mapping]] = ..., lanes: _Optional[_Iterable[_Union[LaneStats, _Mapping]]] = ..., in_flight: _Optional[int] = ..., consumers: _Optional[int] = ..., credit: _Optional[int] = ..., max_messages: _Optional[int] = ..., max_bytes: _Optional[int] = ..., refused_queue_full: _Optional[int] = ..., refused_disk_full: _Optional[int] = ..., refused_publish_rate: _Optional[int] = ..., throttled_calls: _Optional[int] = ..., throttled_ms: _Optional[int] = ..., damaged: _Optional[str] = ..., opening: _Optional[bool] = ..., expired_dead_lettered: _Optional[int] = ..., expired_dropped: _Optional[int] = ..., paced: _Optional[bool] = ..., paced_ms: _Optional[int] = ..., paced_held_back: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("at_ms", "queues", "disk_free_bytes", "disk_free_min_bytes", "cluster")
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    at_ms: int
    queues: _containers.RepeatedCompositeFieldContainer[QueueStats]
    disk_free_bytes: int
    disk_free_min_bytes: int
    cluster: ClusterStatus
    def __init__(self, at_ms: _Optional[int] = ..., queues: _Optional[_Iterable[_Union[QueueStats, _Mapping]]] = ..., disk_free_bytes: _Optional[int] = ..., disk_free_min_bytes: _Optional[int] = ..., cluster: _Optional[_Union[ClusterStatus, _Mapping]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("node_id", "role", "term", "leader_id", "leader_addr", "last_log_index", "last_applied", "peers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDR_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    role: str
    term: int
    leader_id: int
    leader_addr: str
    last_log_index: int
    last_applied: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, node_id: _Optional[int] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., leader_addr: _Optional[str] = ..., last_log_index: _Optional[int] = ..., last_applied: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("node_id", "matched_index", "lag")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    matched_index: int
    lag: int
    def __init__(self, node_id: _Optional[int] = ..., matched_index: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class ConsumeRequest(_message.Message):
    __slots__ = ("subscribe", "credit", "ack", "nack", "extend")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    credit: Credit
    ack: Ack
    nack: Nack
    extend: Extend
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ..., extend: _Optional[_Union[Extend, _Mapping]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("queue", "credit")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    queue: str
    credit: int
    def __init__(self, queue: _Optional[str] = ..., credit: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("credit",)
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    credit: int
    def __init__(self, credit: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("delivery_ids",)
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, delivery_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("delivery_id", "delay_ms", "reason")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    delay_ms: int
    reason: str
    def __init__(self, delivery_id: _Optional[int] = ..., delay_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Extend(_message.Message):
    __slots__ = ("delivery_ids", "lease_ms")
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    lease_ms: int
    def __init__(self, delivery_ids: _Optional[_Iterable[int]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ExtendResult(_message.Message):
    __slots__ = ("delivery_id", "outcome", "lease_deadline_ms")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    outcome: ExtendOutcome
    lease_deadline_ms: int
    def __init__(self, delivery_id: _Optional[int] = ..., outcome: _Optional[_Union[ExtendOutcome, str]] = ..., lease_deadline_ms: _Optional[int] = ...) -> None: ...

class Extended(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExtendResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExtendResult, _Mapping]]] = ...) -> None: ...

class ConsumeResponse(_message.Message):
    __slots__ = ("subscribed", "delivery", "rejected", "extended")
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EXTENDED_FIELD_NUMBER: _ClassVar[int]
    subscribed: Subscribed
    delivery: Delivery
    rejected: Rejected
    extended: Extended
    def __init__(self, subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ..., extended: _Optional[_Union[Extended, _Mapping]] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("queue", "consumer_id")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    queue: str
    consumer_id: int
    def __init__(self, queue: _Optional[str] = ..., consumer_id: _Optional[int] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("delivery_id", "id", "payload", "headers", "idempotency_key", "attempt", "published_at_ms", "lease_deadline_ms", "lease_ms")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    id: MessageId
    payload: bytes
    headers: _containers.ScalarMap[str, str]
    idempotency_key: str
    attempt: int
    published_at_ms: int
    lease_deadline_ms: int
    lease_ms: int
    def __init__(self, delivery_id: _Optional[int] = ..., id: _Optional[_Union[MessageId, _Mapping]] = ..., payload: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., attempt: _Optional[int] = ..., published_at_ms: _Optional[int] = ..., lease_deadline_ms: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("delivery_id", "code", "message")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    code: int
    message: str
    def __init__(self, delivery_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("queue", "max_messages", "wait_ms")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    max_messages: int
    wait_ms: int
    def __init__(self, queue: _Optional[str] = ..., max_messages: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("queue", "delivery_ids")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, queue: _Optional[str] = ..., delivery_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NackRequest(_message.Message):
    __slots__ = ("queue", "delivery_id", "delay_ms", "reason")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    queue: str
    delivery_id: int
    delay_ms: int
    reason: str
    def __init__(self, queue: _Optional[str] = ..., delivery_id: _Optional[int] = ..., delay_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class NackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("queue", "delivery_ids", "lease_ms")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    lease_ms: int
    def __init__(self, queue: _Optional[str] = ..., delivery_ids: _Optional[_Iterable[int]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class PeekRequest(_message.Message):
    __slots__ = ("queue", "start", "max_messages")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    queue: str
    start: MessageId
    max_messages: int
    def __init__(self, queue: _Optional[str] = ..., start: _Optional[_Union[MessageId, _Mapping]] = ..., max_messages: _Optional[int] = ...) -> None: ...

class PeekedMessage(_message.Message):
    __slots__ = ("id", "payload", "headers", "idempotency_key", "attempts", "reason", "published_at_ms", "age_ms")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    id: MessageId
    payload: bytes
    headers: _containers.ScalarMap[str, str]
    idempotency_key: str
    attempts: int
    reason: str
    published_at_ms: int
    age_ms: int
    def __init__(self, id: _Optional[_Union[MessageId, _Mapping]] = ..., payload: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., attempts: _Optional[int] = ..., reason: _Optional[str] = ..., published_at_ms: _Optional[int] = ..., age_ms: _Optional[int] = ...) -> None: ...

class PeekResponse(_message.Message):
    __slots__ = ("messages", "next")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[PeekedMessage]
    next: MessageId
    def __init__(self, messages: _Optional[_Iterable[_Union[PeekedMessage, _Mapping]]] = ..., next: _Optional[_Union[MessageId, _Mapping]] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExtendResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExtendResult, _Mapping]]] = ...) -> None: ...
