#!/bin/sh
# The unit's semantics in a booted VM, with fake workers (fake_worker.py). Prints PASS/FAIL
# lines and "N passed, N failed"; exits non-zero on any failure.
share=/mnt/share
unit=dynamo-vllm@fake.service
passed=0; failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { what=$1; shift; if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi; }
prop() { systemctl show -P "$1" "$unit"; }
waitfor() {  # waitfor SECONDS WHAT CMD...: poll until CMD succeeds
    limit=$1; what=$2; shift 2; i=0
    while [ "$i" -lt "$((limit * 2))" ]; do
        if "$@" >/dev/null 2>&1; then pass "$what"; return 0; fi
        sleep 0.5; i=$((i + 1))
    done
    fail "$what (after ${limit}s)"; return 1
}
# [f]: the pattern must not match the shell that runs pgrep.
nworkers() { pgrep -f '[f]ake_worker.py' | wc -l; }
notvictim() { pgrep -f '[f]ake_worker.py' | grep -vx "$1" | wc -l; }
is() { [ "$(prop "$1")" = "$2" ]; }

started=$(date +%s)
check "dpkg -i installs the package" dpkg -i "$share/dynamo-vllm.deb"
check "the service user exists" id dynamo-vllm
check "systemd-analyze verify is clean" sh -c \
    'out=$(systemd-analyze verify dynamo-vllm@fake.service dynamo-vllm.target 2>&1); [ -z "$out" ] || { echo "$out"; false; }'
check "nothing started on install" sh -c '[ -z "$(systemctl list-units --no-legend "dynamo-vllm@*")" ]'

install -m 0755 "$share/fake_worker.py" /usr/local/lib/fake_worker.py
printf '#!/bin/sh\nexec /usr/bin/python3 /usr/local/lib/fake_worker.py "$@"\n' > /usr/local/bin/fake-python
chmod 755 /usr/local/bin/fake-python
mkdir -p /var/lib/dynamo-vllm/models/fake && echo '{}' > /var/lib/dynamo-vllm/models/fake/config.json
cat > /etc/dynamo-vllm/fake.toml <<'TOML'
[model]
path = "/var/lib/dynamo-vllm/models/fake"
[workers]
count = 2
base_port = 8100
python = "/usr/local/bin/fake-python"
restart_backoff = 0.5
[health]
poll_interval = 1.0
[metrics]
# The host scrapes through QEMU's port forward, which reaches the guest's address, not its
# loopback: an explicit opt-in to a non-loopback bind.
host = "0.0.0.0"
port = 9400
TOML
mkdir -p /etc/systemd/system/$unit.d
printf '[Service]\nWatchdogSec=10\n' > /etc/systemd/system/$unit.d/test.conf
systemctl daemon-reload

check "systemctl start returns success" systemctl start "$unit"
check "active right after start (READY=1 was sent)" is ActiveState active
check "systemctl status shows STATUS=" sh -c "systemctl status --no-pager $unit | grep -q 'Status: \"2/2 workers serving'"
check "two workers run" test "$(nworkers)" -eq 2

# The host scrapes /metrics through the forwarded port.
touch "$share/guest-ready"
i=0; while [ ! -f "$share/host-done" ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i + 1)); done
check "the host scraped /metrics" grep -q "dynamo_agent_workers_serving 2.0" "$share/host-done"

victim=$(pgrep -f '[f]ake_worker.py' | head -1)
kill -9 "$victim"
i=0; while [ "$(notvictim "$victim")" -ne 2 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
check "a killed worker is replaced" test "$(notvictim "$victim")" -eq 2
check "the unit was not restarted" is NRestarts 0
check "the unit stayed active" is ActiveState active

check "systemctl reload succeeds" systemctl reload "$unit"
waitfor 30 "the journal shows the reload" sh -c "journalctl -u $unit -o cat | grep -q 'Reloaded'"
check "journal lines carry priorities (-p err has no info lines)" sh -c \
    "! journalctl -u $unit -p err -o cat | grep -q 'serving on port'"
check "journal identifier is dynamo-vllm" sh -c "journalctl -t dynamo-vllm -o cat | grep -q 'worker'"

main=$(prop MainPID)
kill -STOP "$main"
waitfor 90 "a stopped supervisor is killed by the watchdog and restarted" \
    sh -c "[ \"\$(systemctl show -P NRestarts $unit)\" -ge 1 ]"
check "the journal says Watchdog timeout" sh -c "journalctl -u $unit -o cat | grep -q 'Watchdog timeout'"
waitfor 60 "serving again after the restart" sh -c "systemctl status --no-pager $unit | grep -q 'Status: \"2/2 workers serving'"
check "no orphaned worker from the old life" test "$(nworkers)" -eq 2

printf '[model]\npath = "/var/lib/dynamo-vllm/models/fake"\n[workers]\ncout = 2\n' > /etc/dynamo-vllm/bad.toml
systemctl start dynamo-vllm@bad.service >/dev/null 2>&1
sleep 7
check "a bad config fails with exit 78" sh -c '[ "$(systemctl show -P ExecMainStatus dynamo-vllm@bad.service)" = 78 ]'
check "a bad config is not restarted" sh -c '[ "$(systemctl show -P NRestarts dynamo-vllm@bad.service)" = 0 ]'
check "the journal names the bad key" sh -c "journalctl -u dynamo-vllm@bad.service -o cat | grep -q 'workers.cout'"

check "systemctl stop succeeds" systemctl stop "$unit"
check "stop leaves no worker" test "$(nworkers)" -eq 0
check "stop result is success" is Result success

systemctl start "$unit"
check "dpkg -r succeeds" dpkg -r dynamo-vllm
check "dpkg -r stopped the running instance" test "$(pgrep -f '[f]ake_worker.py|[d]ynamo-vllm run' | wc -l)" -eq 0
check "dpkg -P leaves nothing of its own, keeps the operator's models" sh -c 'dpkg -P dynamo-vllm && [ ! -e /opt/dynamo-vllm ] && [ ! -e /var/lib/dynamo-vllm/checkpoints ] && [ "$(ls -A /var/lib/dynamo-vllm)" = models ] && [ ! -e /etc/dynamo-vllm/example.toml ]'

echo "scenario took $(( $(date +%s) - started )) s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
