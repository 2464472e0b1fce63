"""The app ``durably serve --app tests.web.served:durably`` serves in the dashboard tests."""

from __future__ import annotations

import os

from tests.web.app import make

durably = make(os.environ["DURABLY_WEB_TEST_DB"])
