"""The library's user-facing error types, in one place for the CLI to catch."""

from steer.data import DataError
from steer.demo import DemoModelError
from steer.hardware import HardwareError
from steer.models import ModelError
from steer.vectors import VectorError

USER_ERRORS: tuple[type[Exception], ...] = (DataError, DemoModelError, HardwareError, ModelError, VectorError)
