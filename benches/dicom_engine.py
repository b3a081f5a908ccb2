#!/usr/bin/env python3
"""The DICOM node's anchor (issue 25): the integration-engine pattern a site would otherwise run
in front of the service. A pynetdicom Storage SCP receives a series (every instance kept in
memory, as sent); when the association that sent it is released, a worker calls the service's
gRPC ClassifySeries with the instances (structured_report=true) and C-STOREs the returned SR to
the destination with pynetdicom as SCU. The same job as `brainai serve --dicom-addr ...
--dicom-trigger association`, with only the front end changed.

Usage:  dicom_engine.py --port PORT --grpc HOST:PORT --descriptor brainai_descriptor.bin
                        --destination AE@HOST:PORT --timings FILE [--model NAME] [--ae-title AE]

The gRPC messages are built from the descriptor set the release build writes
(target/release/build/brainai-serve-*/out/brainai_descriptor.bin; no generated stubs needed).
Per job, one JSON line is appended to --timings (wall-clock epoch seconds, time.time(), so the
caller can compare them with `date +%s.%N`): first/last instance received, association released,
gRPC call start/end, C-STORE out start/end, instances, SR bytes, status. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import signal
import sys
import threading
import time

import grpc
import pydicom
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

METHOD = "/brainai.v1.TumorClassifier/ClassifySeries"
GRPC_TIMEOUT_S = 120.0
IMAGE_FORMAT_DICOM = 4


def messages(descriptor: str):
    fds = descriptor_pb2.FileDescriptorSet()
    with open(descriptor, "rb") as f:
        fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    pending = list(fds.file)
    # Add files once their dependencies are in the pool (the set is usually in order already).
    while pending:
        added = False
        for fd in list(pending):
            try:
                pool.Add(fd)
            except (TypeError, KeyError):
                continue
            pending.remove(fd)
            added = True
        if not added:
            raise SystemExit(f"{descriptor}: cannot resolve {[fd.name for fd in pending]}")
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
    return get("brainai.v1.ClassifySeriesRequest"), get("brainai.v1.ClassifySeriesResponse")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ae-title", default="ENGINE")
    p.add_argument("--grpc", required=True, help="HOST:PORT of the service's gRPC API")
    p.add_argument("--descriptor", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--destination", required=True, help="AE@HOST:PORT")
    p.add_argument("--timings", required=True)
    args = p.parse_args()

    request_cls, response_cls = messages(args.descriptor)
    dest_ae, dest = args.destination.split("@", 1)
    dest_host, dest_port = dest.rsplit(":", 1)
    channel = grpc.insecure_channel(
        args.grpc,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)],
    )
    classify_series = channel.unary_unary(
        METHOD, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
    )

    ae = AE(ae_title=args.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.add_requested_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30

    received: dict[int, dict] = {}
    lock = threading.Lock()
    jobs: queue.Queue = queue.Queue()

    def on_store(event):
        now = time.time()
        data = event.encoded_dataset()
        with lock:
            job = received.setdefault(id(event.assoc), {"first": now, "instances": []})
            job["instances"].append(data)
            job["last"] = time.time()
        return 0x0000

    def on_released(event):
        with lock:
            job = received.pop(id(event.assoc), None)
        if job:
            job["released"] = time.time()
            jobs.put(job)

    def on_aborted(event):
        with lock:
            received.pop(id(event.assoc), None)

    def worker():
        while True:
            job = jobs.get()
            record = {k: job[k] for k in ("first", "last", "released")}
            record["instances"] = len(job["instances"])
            try:
                request = request_cls(model=args.model, structured_report=True)
                for i, data in enumerate(job["instances"]):
                    image = request.instances.add()
                    image.id = str(i)
                    image.data = data
                    image.format = IMAGE_FORMAT_DICOM
                record["grpc_start"] = time.time()
                response = classify_series(request, timeout=GRPC_TIMEOUT_S)
                record["grpc_end"] = time.time()
                record["sr_bytes"] = len(response.structured_report)
                sr = pydicom.dcmread(io.BytesIO(response.structured_report))
                record["cstore_start"] = time.time()
                assoc = ae.associate(dest_host, int(dest_port), ae_title=dest_ae)
                if not assoc.is_established:
                    raise RuntimeError(f"association to {args.destination} not established")
                status = assoc.send_c_store(sr)
                assoc.release()
                record["cstore_end"] = time.time()
                code = getattr(status, "Status", None)
                record["status"] = "ok" if code == 0 else f"C-STORE status {code}"
            except Exception as e:  # noqa: BLE001: the bench reports it
                record["status"] = f"error: {type(e).__name__}: {e}"
            with open(args.timings, "a") as f:
                f.write(json.dumps(record) + "\n")

    threading.Thread(target=worker, daemon=True).start()
    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_RELEASED, on_released),
        (evt.EVT_ABORTED, on_aborted),
    ]
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"engine listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown()
    channel.close()


if __name__ == "__main__":
    main()
