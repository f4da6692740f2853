"""Training data: the WebDataset shard reader, training windows, the encoders' batch layout.

Every stored clip plays at FPS video frames and SAMPLE_RATE mono audio samples per second (the data
job resamples to these), so one video frame is SAMPLE_RATE / FPS = 640 samples.
"""

FPS = 25
SAMPLE_RATE = 16_000
