"""What every role shares. Importing it sets the process environment TensorFlow reads (see
`process.configure_process`), before any module of the project can import TensorFlow."""
from common.process import configure_process

configure_process()
