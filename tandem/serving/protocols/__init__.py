"""Wire protocols spoken by the server; each module is a pure codec (bytes <-> numpy), no I/O."""

from __future__ import annotations

from tandem.serving.protocols.v2 import (
    HEADER_LENGTH_HEADER,
    SERVER_EXTENSIONS,
    V2InferRequest,
    V2Input,
    V2RequestedOutput,
    encode_infer_response,
    model_metadata,
    parse_header_length,
    parse_infer_request,
    server_metadata,
)

__all__ = [
    "HEADER_LENGTH_HEADER", "SERVER_EXTENSIONS", "V2InferRequest", "V2Input", "V2RequestedOutput",
    "encode_infer_response", "model_metadata", "parse_header_length", "parse_infer_request",
    "server_metadata",
]
