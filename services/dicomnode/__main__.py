"""``python -m services.dicomnode --help``: run the DICOM node until SIGTERM."""

from services.common.server import run_service
from services.dicomnode.config import DicomNodeConfig
from services.dicomnode.server import serve

if __name__ == "__main__":
    run_service(DicomNodeConfig.from_env_and_args, serve)
