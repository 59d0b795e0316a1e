from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReachabilityKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REACHABILITY_UNKNOWN: _ClassVar[ReachabilityKind]
    REACHABILITY_DIRECT: _ClassVar[ReachabilityKind]
    REACHABILITY_RELAYED: _ClassVar[ReachabilityKind]
REACHABILITY_UNKNOWN: ReachabilityKind
REACHABILITY_DIRECT: ReachabilityKind
REACHABILITY_RELAYED: ReachabilityKind

class HelloRequest(_message.Message):
    __slots__ = ("version", "client_public_key", "client_nonce", "server_cert_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    client_public_key: bytes
    client_nonce: bytes
    server_cert_sha256: bytes
    def __init__(self, version: _Optional[int] = ..., client_public_key: _Optional[bytes] = ..., client_nonce: _Optional[bytes] = ..., server_cert_sha256: _Optional[bytes] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("version", "server_public_key", "server_nonce", "server_signature", "server_swarm_proof")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SERVER_SWARM_PROOF_FIELD_NUMBER: _ClassVar[int]
    version: int
    server_public_key: bytes
    server_nonce: bytes
    server_signature: bytes
    server_swarm_proof: bytes
    def __init__(self, version: _Optional[int] = ..., server_public_key: _Optional[bytes] = ..., server_nonce: _Optional[bytes] = ..., server_signature: _Optional[bytes] = ..., server_swarm_proof: _Optional[bytes] = ...) -> None: ...

class ProveRequest(_message.Message):
    __slots__ = ("server_nonce", "client_signature", "client_swarm_proof", "client_record")
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SWARM_PROOF_FIELD_NUMBER: _ClassVar[int]
    CLIENT_RECORD_FIELD_NUMBER: _ClassVar[int]
    server_nonce: bytes
    client_signature: bytes
    client_swarm_proof: bytes
    client_record: SignedPeerRecord
    def __init__(self, server_nonce: _Optional[bytes] = ..., client_signature: _Optional[bytes] = ..., client_swarm_proof: _Optional[bytes] = ..., client_record: _Optional[_Union[SignedPeerRecord, _Mapping]] = ...) -> None: ...

class ProveResponse(_message.Message):
    __slots__ = ("session_token", "session_ttl_s")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    session_ttl_s: float
    def __init__(self, session_token: _Optional[str] = ..., session_ttl_s: _Optional[float] = ...) -> None: ...

class SignedRecord(_message.Message):
    __slots__ = ("key", "value", "publisher_public_key", "published_at_s", "expires_at_s", "signature")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_S_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    publisher_public_key: bytes
    published_at_s: float
    expires_at_s: float
    signature: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., publisher_public_key: _Optional[bytes] = ..., published_at_s: _Optional[float] = ..., expires_at_s: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("num_cpus", "memory_bytes", "num_gpus", "gpu_names", "measured_bandwidth_bytes_per_s")
    NUM_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_NAMES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    num_cpus: int
    memory_bytes: int
    num_gpus: int
    gpu_names: _containers.RepeatedScalarFieldContainer[str]
    measured_bandwidth_bytes_per_s: float
    def __init__(self, num_cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., num_gpus: _Optional[int] = ..., gpu_names: _Optional[_Iterable[str]] = ..., measured_bandwidth_bytes_per_s: _Optional[float] = ...) -> None: ...

class PeerRecordValue(_message.Message):
    __slots__ = ("addresses", "reachability", "relays", "capabilities", "tls_cert_der", "relay_service")
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_DER_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    reachability: ReachabilityKind
    relays: _containers.RepeatedCompositeFieldContainer[RelayHop]
    capabilities: Capabilities
    tls_cert_der: bytes
    relay_service: bool
    def __init__(self, addresses: _Optional[_Iterable[str]] = ..., reachability: _Optional[_Union[ReachabilityKind, str]] = ..., relays: _Optional[_Iterable[_Union[RelayHop, _Mapping]]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., tls_cert_der: _Optional[bytes] = ..., relay_service: _Optional[bool] = ...) -> None: ...

class RelayHop(_message.Message):
    __slots__ = ("relay_peer_id", "relay_address")
    RELAY_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    relay_peer_id: str
    relay_address: str
    def __init__(self, relay_peer_id: _Optional[str] = ..., relay_address: _Optional[str] = ...) -> None: ...

class SignedPeerRecord(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: SignedRecord
    def __init__(self, record: _Optional[_Union[SignedRecord, _Mapping]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("sender", "sequence")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sender: SignedPeerRecord
    sequence: int
    def __init__(self, sender: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("sequence", "responder", "wall_time_s")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    responder: SignedPeerRecord
    wall_time_s: float
    def __init__(self, sequence: _Optional[int] = ..., responder: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., wall_time_s: _Optional[float] = ...) -> None: ...

class FindNodeRequest(_message.Message):
    __slots__ = ("sender", "target", "known_filter")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FILTER_FIELD_NUMBER: _ClassVar[int]
    sender: SignedPeerRecord
    target: bytes
    known_filter: bytes
    def __init__(self, sender: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., target: _Optional[bytes] = ..., known_filter: _Optional[bytes] = ...) -> None: ...

class FindNodeResponse(_message.Message):
    __slots__ = ("closest", "responder", "gossip")
    CLOSEST_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    closest: _containers.RepeatedCompositeFieldContainer[SignedPeerRecord]
    responder: SignedPeerRecord
    gossip: _containers.RepeatedCompositeFieldContainer[SignedPeerRecord]
    def __init__(self, closest: _Optional[_Iterable[_Union[SignedPeerRecord, _Mapping]]] = ..., responder: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., gossip: _Optional[_Iterable[_Union[SignedPeerRecord, _Mapping]]] = ...) -> None: ...

class FindValueRequest(_message.Message):
    __slots__ = ("sender", "key")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    sender: SignedPeerRecord
    key: bytes
    def __init__(self, sender: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., key: _Optional[bytes] = ...) -> None: ...

class FindValueResponse(_message.Message):
    __slots__ = ("records", "closest", "responder")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CLOSEST_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    closest: _containers.RepeatedCompositeFieldContainer[SignedPeerRecord]
    responder: SignedPeerRecord
    def __init__(self, records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., closest: _Optional[_Iterable[_Union[SignedPeerRecord, _Mapping]]] = ..., responder: _Optional[_Union[SignedPeerRecord, _Mapping]] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("sender", "record")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    sender: SignedPeerRecord
    record: SignedRecord
    def __init__(self, sender: _Optional[_Union[SignedPeerRecord, _Mapping]] = ..., record: _Optional[_Union[SignedRecord, _Mapping]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "reason")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    reason: str
    def __init__(self, stored: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class BulkChunk(_message.Message):
    __slots__ = ("transfer_id", "topic", "total_bytes", "offset", "data", "num_streams")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_STREAMS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    topic: str
    total_bytes: int
    offset: int
    data: bytes
    num_streams: int
    def __init__(self, transfer_id: _Optional[str] = ..., topic: _Optional[str] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., num_streams: _Optional[int] = ...) -> None: ...

class BulkAck(_message.Message):
    __slots__ = ("received_bytes", "transfer_complete")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    transfer_complete: bool
    def __init__(self, received_bytes: _Optional[int] = ..., transfer_complete: _Optional[bool] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DialBackResponse(_message.Message):
    __slots__ = ("observed_address", "reachable_addresses", "detail")
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    observed_address: str
    reachable_addresses: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    def __init__(self, observed_address: _Optional[str] = ..., reachable_addresses: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("direct",)
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    direct: bool
    def __init__(self, direct: _Optional[bool] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("tunnel_id", "dialer_peer_id", "reserved")
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIALER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    tunnel_id: str
    dialer_peer_id: str
    reserved: bool
    def __init__(self, tunnel_id: _Optional[str] = ..., dialer_peer_id: _Optional[str] = ..., reserved: _Optional[bool] = ...) -> None: ...

class TunnelFrame(_message.Message):
    __slots__ = ("target_peer_id", "tunnel_id", "data", "close")
    TARGET_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    target_peer_id: str
    tunnel_id: str
    data: bytes
    close: bool
    def __init__(self, target_peer_id: _Optional[str] = ..., tunnel_id: _Optional[str] = ..., data: _Optional[bytes] = ..., close: _Optional[bool] = ...) -> None: ...
