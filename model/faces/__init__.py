"""Face detection with five landmarks (RetinaFace, run by onnxruntime) and face crops, optionally aligned
so the eye line is level. `base` holds the types every detector shares."""
