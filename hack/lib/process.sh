# shellcheck shell=bash
# Watching and stopping processes by PID, shared by hack/control-plane.sh and hack/node.sh.
# Sourced, never executed; prints nothing. Liveness comes from /proc (no procps needed).
# Expects a `log` function (hack/lib/control-plane.sh defines it).

# proc_state PID: the state letter of /proc/PID/stat (R, S, D, T, Z, ...); fails when no such PID.
proc_state() {
  local stat
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  # The command name (field 2) may hold spaces and ')': the state follows its last ')'.
  stat="${stat##*) }"
  printf '%s\n' "${stat%% *}"
}

# proc_pgid PID: its process group.
proc_pgid() {
  local stat fields
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  read -r -a fields <<<"${stat##*) }"
  printf '%s\n' "${fields[2]}"
}

# proc_started_epoch PID: when the process started, in seconds since the epoch.
proc_started_epoch() {
  local stat fields btime ticks
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  read -r -a fields <<<"${stat##*) }"
  btime="$(awk '$1 == "btime" {print $2}' /proc/stat)"
  ticks="$(getconf CLK_TCK)"
  # Field 22 of stat (index 19 after the command name): start time in clock ticks since boot.
  printf '%s\n' "$((btime + fields[19] / ticks))"
}

# read_pid_file FILE: the PID FILE records, unless that PID now names a process started after
# FILE was written (the recorded process is gone and its PID was reused: not ours to signal).
read_pid_file() {
  local file=$1 pid started
  [[ -f "${file}" ]] || return 1
  pid="$(<"${file}")"
  if started="$(proc_started_epoch "${pid}")" && ((started > $(stat -c %Y "${file}") + 2)); then
    log "pid ${pid} of ${file} is another process now (started after the file was written); leaving it alone"
    return 1
  fi
  printf '%s\n' "${pid}"
}

# running PID: the process exists and is neither a zombie nor dead (PID 1 in a container may
# never reap what it inherits).
running() {
  local state
  state="$(proc_state "$1")" || return 1
  [[ "${state}" != Z && "${state}" != X ]]
}

# stop_pid NAME PID [GRACE_S]: SIGTERM, up to GRACE_S (default 10) for it to exit, then SIGKILL,
# and verify it is gone. A process that leads its own group (started with setsid) is signalled
# with its whole group, so its children (a shell's `sleep`) go with it. Returns 1, saying so, if
# it still runs after SIGKILL. No PID, or the caller's own PID, is nothing to stop.
stop_pid() {
  local name=$1 pid=$2 grace=${3:-10} target i
  [[ -n "${pid}" && "${pid}" != "$$" ]] || return 0
  running "${pid}" || return 0
  target="${pid}"
  [[ "$(proc_pgid "${pid}")" == "${pid}" ]] && target="-${pid}"
  kill -TERM -- "${target}" 2>/dev/null || true
  for ((i = 0; i < grace * 4; i++)); do
    running "${pid}" || return 0
    sleep 0.25
  done
  log "${name} (pid ${pid}) ignored SIGTERM for ${grace} s; sending SIGKILL"
  kill -KILL -- "${target}" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    running "${pid}" || return 0
    sleep 0.25
  done
  log "${name} (pid ${pid}) is still running 5 s after SIGKILL (state $(proc_state "${pid}"))"
  return 1
}
