"""An OTLP trace receiver on loopback ports, built from the OpenTelemetry protos.

It serves the gRPC ``TraceService`` and the HTTP ``POST /v1/traces`` endpoint (protobuf,
gzip or not), each on a free port of its own, in threads (independent of the test's event
loop), and keeps every span it is sent with its service's name. ``exports`` counts the
export calls, so a test can tell that none was made.
"""

from __future__ import annotations

import gzip
import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

KINDS = {
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_INTERNAL: "internal",
}


def value_of(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


@dataclass
class Received:
    """One span as it arrived."""

    service: str
    protocol: str  # grpc or http
    span: Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def kind(self) -> str:
        return KINDS.get(self.span.kind, str(self.span.kind))

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: value_of(kv.value) for kv in self.span.attributes}

    @property
    def events(self) -> list[str]:
        return [event.name for event in self.span.events]

    @property
    def error(self) -> bool:
        return self.span.status.code == self.span.status.STATUS_CODE_ERROR


class OtlpReceiver:
    def __init__(self, *, grpc_port: int = 0, http_port: int = 0) -> None:
        """Free ports unless given."""
        self.spans: list[Received] = []
        self.exports = 0
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", http_port), _handler(self))
        self.http_port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> OtlpReceiver:
        self._grpc.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(None)
        self._http.shutdown()
        self._http.server_close()

    def endpoint(self, protocol: str) -> str:
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return f"http://127.0.0.1:{port}"

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        with self._lock:
            self.exports += 1
            for resource_spans in request.resource_spans:
                attributes = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
                service = str(attributes.get("service.name", ""))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(Received(service, protocol, span) for span in scope_spans.spans)

    def named(self, service: str, kind: str) -> list[Received]:
        with self._lock:
            return [s for s in self.spans if s.service == service and s.kind == kind]


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.take(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(404)
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            receiver.take(request, "http")
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
