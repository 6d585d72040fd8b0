"""The cloud half: what receives the vehicles' batches (the reference receiver) and reads
them back into records. It shares only the wire's definitions with the device side."""
