"""The floor for the latency benchmark: a grpc.aio ExternalScaler that answers a constant.

Same runtime, same protocol, no work: what the scaler adds is the difference.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc


class Constant(pb_grpc.ExternalScalerServicer):
    async def GetMetricSpec(self, request, context):
        return pb.GetMetricSpecResponse(
            metricSpecs=[pb.MetricSpec(metricName="token-demand", targetSizeFloat=1.0)]
        )

    async def GetMetrics(self, request, context):
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=request.metricName, metricValueFloat=1.0)]
        )

    async def IsActive(self, request, context):
        return pb.IsActiveResponse(result=True)


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(Constant(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
