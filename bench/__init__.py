"""The service measured against the hardware's limit: `python -m bench.run [--quick]`.

One run, one machine, one device: the raw encoder's throughput, the served throughput and latency under
load (batching on and off), video latency for short and long clips with and without face detection,
video latency of a clip of three people with tracks against one face a frame (as before tracks), the
service's memory over a long run, and the face detector's recall and speed (bench.faces), with the
targets evaluated as ratios of figures from that same run.
"""
