# Every target that runs code installs first: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench soak run proto broker postgres systemd-tools install-service vm-test fleet-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install broker postgres systemd-tools
	$(BIN)/python -m pytest -q
	$(MAKE) lint

# The MQTT tests start their own mosquitto on a free loopback port: install it where missing.
broker:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto >/dev/null; }

# tests/test_sinks.py writes into the PostgreSQL on 127.0.0.1:5432 (trust auth, database
# `test`, a schema per test). Where none answers there: install it (C.UTF-8 locale, so the
# package makes its cluster whatever the environment names), add `host all all
# 127.0.0.1/32 trust` to the top of its pg_hba.conf, start it. Never asks for a password:
# fails with a message if the server there wants one, or does not come up.
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		command -v pg_ctlcluster >/dev/null || { $$SUDO apt-get update -qq && \
			$$SUDO env LANG=C.UTF-8 LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq postgresql >/dev/null; }; \
		version=$$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1); \
		hba=/etc/postgresql/$$version/main/pg_hba.conf; \
		$$SUDO test -f "$$hba" || { \
			echo "make postgres: no PostgreSQL cluster at $$hba (pg_lsclusters)" >&2; exit 1; }; \
		$$SUDO grep -q '^host all all 127.0.0.1/32 trust' $$hba || \
			$$SUDO sed -i '1i host all all 127.0.0.1/32 trust' $$hba; \
		$$SUDO pg_ctlcluster $$version main start >/dev/null 2>&1 || \
			$$SUDO pg_ctlcluster $$version main reload; \
		for _ in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
		pg_isready -q -h 127.0.0.1 -p 5432 || { echo "make postgres: PostgreSQL $$version" \
			"not answering on 127.0.0.1:5432 after 30 s (pg_lsclusters)" >&2; exit 1; }; }
	@found=$$(psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc \
		"SELECT 1 FROM pg_database WHERE datname = 'test'" 2>&1) || { \
		echo "make postgres: cannot connect to 127.0.0.1:5432 as postgres without a" \
			"password (it needs trust for 127.0.0.1 in pg_hba.conf): $$found" >&2; exit 1; }; \
	test "$$found" = 1 || createdb -w -h 127.0.0.1 -p 5432 -U postgres test

# tests/test_deploy.py checks the unit with `systemd-analyze verify`: install it where missing.
systemd-tools:
	@command -v systemd-analyze >/dev/null || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq systemd >/dev/null; }

# The agent as a systemd service: /opt/telemetry-agent, /etc/telemetry-agent, the unit.
# Needs root: `sudo make install-service`. Options: INSTALL_ARGS="--vehicle-id VIN123"
# (deploy/install.sh --help lists them). Run again to upgrade; agent.toml is kept.
INSTALL_ARGS ?=
install-service:
	sh deploy/install.sh $(INSTALL_ARGS)

# The generated protobuf module; a test checks that the committed one is what this makes.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iagent/wire=proto --python_out=. --pyi_out=. \
		proto/telemetry.proto

lint: install
	$(BIN)/ruff check agent harness tests bench
	$(BIN)/ruff format --check agent harness tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

# A fleet (FLEET_VEHICLES simulated vehicles, 25 per process, at real time) through one
# mosquitto into two receivers of a share group writing to PostgreSQL (bench/fleet.py).
FLEET_VEHICLES ?= 100
fleet-bench: install broker postgres
	$(BIN)/python -m bench.fleet --vehicles $(FLEET_VEHICLES)

# Replayed traffic for SOAK_SECONDS with the broker and the agent killed at random moments:
# frames sent, received, lost, and the drops the agent counted (see bench/soak.py).
SOAK_SECONDS ?= 600
soak: install broker
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS)

# The agent on a real gateway: a Debian VM (systemd, SocketCAN on vcan, mosquitto) booted
# with qemu, the agent installed by deploy/install.sh, every check of tests/vm/guest.py in
# it, and build/vm-test/report.json. Needs root; installs qemu and debootstrap where
# missing. The image is cached in ~/.cache/telemetry-agent-vm (VM_CACHE), not under the
# checkout, so `make clean` leaves it.
vm-test: install
	$(BIN)/python -m tests.vm.host

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The agent on its embedded defaults: simulated traffic of dbc/demo.dbc into state/outbox,
# metrics on 127.0.0.1:9108. Ctrl-C stops it.
run: install
	$(BIN)/telemetry-agent run
