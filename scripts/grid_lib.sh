# shellcheck shell=bash disable=SC2034  # (the GRID_* and POINT_* variables are the interface)
# The grid of a sweep, shared by sweep.sh (runs it on this machine) and sweep_slurm.sh (runs it
# as a SLURM job array): the grid options, the points, and each point's directory, state, log and
# command. Source it after setting GRID_PROG (the script's name, for messages); it defines
# functions and GRID_* variables and runs nothing.
#
# A point is one (seed, density, init, growth). Point i (0-based) of a grid with D densities,
# I inits, G growths and S seeds is
#     growth i % G,  init (i / G) % I,  density (i / (G*I)) % D,  seed i / (G*I*D)
# so seeds vary slowest: the first D*I*G points fill every table cell once.
#
# Point i runs   $PYTHON SCRIPT FLAGS... --density d --sparse_init i --growth g --seed s
#                    --output_dir OUT/<i>_<g>_d<d>_s<s> --resume
# with its console output appended to OUT/logs/<same name>.log.

# The axes; the environment may set them, the options --densities ... override them.
GRID_DENSITIES=${DENSITIES:-0.2,0.1,0.05}
GRID_INITS=${INITS:-ERK,uniform}
GRID_GROWTHS=${GROWTHS:-random,unfired,momentum,gradient}
GRID_SEEDS=${SEEDS:-0}
GRID_OUT=${OUT:-}            # default: runs/sweep-<script name>[-<T>tasks], set by grid_setup
GRID_RETRY_FAILED=0          # 1: rerun points whose run stopped early (with --overwrite)
GRID_SCRIPT=                 # the entry script, e.g. cifar100.py
GRID_FLAGS=()                # the flags every run gets
GRID_PYTHON=                 # the interpreter: $PYTHON, else python, else python3

# Flags the sweep sets for every point; a user passing them would fight the grid.
GRID_OWNED_FLAGS=(--density --sparse_init --init --growth --seed --output_dir --resume --no-resume --overwrite)

GRID_OPTIONS_HELP='  --densities LIST   fractions of weights per task (env DENSITIES; default 0.2,0.1,0.05)
  --inits LIST       per-layer density allocations (env INITS; default ERK,uniform)
  --growths LIST     regrowth criteria (env GROWTHS; default random,unfired,momentum,gradient)
  --seeds LIST       seeds (env SEEDS; default 0)
  --out DIR          sweep folder, one run directory per point (env OUT;
                     default runs/sweep-<script>[-<T>tasks])
  --retry-failed     run again (with --overwrite) the points whose results.json says the run
                     stopped early; without it they are reported as failed and left alone'

# One line on stderr and exit code 2: the user can fix this.
grid_die() {
  echo "$GRID_PROG: $*" >&2
  exit 2
}

# If $1 is a grid option, store it (with its value $2) and return 0; else return 1.
# The caller shifts by GRID_SHIFT (1 or 2).
grid_take_option() {
  local option=$1
  case $option in
    --densities | --inits | --growths | --seeds | --out)
      [[ $# -ge 2 && $2 != --* ]] || grid_die "$option needs a value"
      GRID_SHIFT=2
      case $option in
        --densities) GRID_DENSITIES=$2 ;;
        --inits) GRID_INITS=$2 ;;
        --growths) GRID_GROWTHS=$2 ;;
        --seeds) GRID_SEEDS=$2 ;;
        --out) GRID_OUT=$2 ;;
      esac
      ;;
    --retry-failed) GRID_RETRY_FAILED=1 GRID_SHIFT=1 ;;
    *) return 1 ;;
  esac
}

# Parse a script's command line into the grid options, DRY_RUN and, after `--`, RUN_ARGS. The
# script's own options are taken by its function take_script_option (same contract as
# grid_take_option); -h/--help calls its function usage.
grid_parse_args() {
  local seen_separator=0
  while (($#)); do
    if [[ $1 == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    case $1 in
      -h | --help) usage && exit 0 ;;
      --dry-run) DRY_RUN=1 && shift ;;
      --) seen_separator=1 && shift && break ;;
      -*)
        take_script_option "$@" || grid_take_option "$@" || grid_die "unknown option '$1' (see --help)"
        shift "$GRID_SHIFT"
        ;;
      *) grid_die "expected -- before the entry script, got '$1' (see --help)" ;;
    esac
  done
  ((seen_separator)) || grid_die "missing -- and the entry script (e.g. -- cifar100.py --num_tasks 10)"
  RUN_ARGS=("$@")
}

# Split the comma-separated list $3 of axis $2 into the array named $1, checking each value
# against the extended regex $4 ($5 says what is allowed, for the message).
grid_split_axis() {
  local -n axis=$1
  local name=$2 list=$3 pattern=$4 allowed=$5 value
  IFS=, read -ra axis <<<"$list"
  ((${#axis[@]})) || grid_die "--$name is empty"
  for value in "${axis[@]}"; do
    [[ $value =~ $pattern ]] || grid_die "--$name: '$value' is not allowed ($allowed)"
  done
}

# The value of flag $1 in the remaining arguments (either "--flag value" or "--flag=value").
grid_flag_value() {
  local flag=$1
  shift
  while (($#)); do
    case $1 in
      "$flag") echo "${2-}" && return ;;
      "$flag"=*) echo "${1#*=}" && return ;;
    esac
    shift
  done
}

# Locate the entry script: as given (relative to here), else in the project root.
grid_resolve_script() {
  local script=$1 root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -f $script ]]; then
    echo "$script"
  elif [[ $script != /* && -f $root/$script ]]; then
    echo "$root/$script"
  else
    grid_die "entry script '$script' not found (here or in $root)"
  fi
}

grid_find_python() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif command -v python >/dev/null; then
    echo python
  elif command -v python3 >/dev/null; then
    echo python3
  else
    grid_die "no python on PATH; set PYTHON=/path/to/python"
  fi
}

# Check and store everything after `--`: the entry script and the flags of every run; split
# and check the axes; default the sweep folder.
grid_setup() {
  (($#)) || grid_die "missing the entry script after -- (e.g. -- cifar100.py --num_tasks 10)"
  [[ $1 != -* ]] || grid_die "expected the entry script right after --, got '$1'"
  GRID_SCRIPT=$(grid_resolve_script "$1")
  shift
  GRID_FLAGS=("$@")
  local flag owned
  for flag in "${GRID_FLAGS[@]}"; do
    for owned in "${GRID_OWNED_FLAGS[@]}"; do
      [[ $flag == "$owned" || $flag == "$owned"=* ]] &&
        grid_die "$owned is set by the sweep for every point; use the grid options (see --help)"
    done
  done
  grid_split_axis GRID_DENSITY_LIST densities "$GRID_DENSITIES" '^[0-9]*\.?[0-9]+$' 'numbers in (0, 1]'
  grid_split_axis GRID_INIT_LIST inits "$GRID_INITS" '^([Ee][Rr][Kk]|uniform)$' 'ERK, uniform'
  grid_split_axis GRID_GROWTH_LIST growths "$GRID_GROWTHS" \
    '^(random|unfired|random_unfired|momentum|gradient)$' 'random, unfired, momentum, gradient'
  grid_split_axis GRID_SEED_LIST seeds "$GRID_SEEDS" '^[0-9]+$' 'integers >= 0'
  if [[ -z $GRID_OUT ]]; then
    local tasks name
    name=$(basename "$GRID_SCRIPT" .py)
    tasks=$(grid_flag_value --num_tasks "${GRID_FLAGS[@]}")
    GRID_OUT=runs/sweep-$name${tasks:+-${tasks}tasks}
  fi
  GRID_PYTHON=$(grid_find_python)
}

grid_size() {
  echo $((${#GRID_DENSITY_LIST[@]} * ${#GRID_INIT_LIST[@]} * ${#GRID_GROWTH_LIST[@]} * ${#GRID_SEED_LIST[@]}))
}

# One line describing the grid, e.g. "8 points (densities 0.2,0.1 x inits ERK x ...) in runs/x".
grid_describe() {
  echo "$(grid_size) points (densities $GRID_DENSITIES x inits $GRID_INITS x growths $GRID_GROWTHS" \
    "x seeds $GRID_SEEDS) in $GRID_OUT"
}

# Select point $1: sets POINT_DENSITY, POINT_INIT, POINT_GROWTH, POINT_SEED, POINT_NAME,
# POINT_DIR (its run directory) and POINT_LOG (its console log).
grid_point() {
  local i=$1
  local n_growths=${#GRID_GROWTH_LIST[@]} n_inits=${#GRID_INIT_LIST[@]} n_densities=${#GRID_DENSITY_LIST[@]}
  POINT_GROWTH=${GRID_GROWTH_LIST[i % n_growths]}
  POINT_INIT=${GRID_INIT_LIST[i / n_growths % n_inits]}
  POINT_DENSITY=${GRID_DENSITY_LIST[i / (n_growths * n_inits) % n_densities]}
  POINT_SEED=${GRID_SEED_LIST[i / (n_growths * n_inits * n_densities)]}
  POINT_NAME=${POINT_INIT}_${POINT_GROWTH}_d${POINT_DENSITY}_s${POINT_SEED}
  POINT_DIR=$GRID_OUT/$POINT_NAME
  POINT_LOG=$GRID_OUT/logs/$POINT_NAME.log
}

# The state of the selected point's run directory:
#   complete    results.json of a finished run (no "complete": false in it)
#   failed      results.json of a run that stopped early ("complete": false), e.g. diverged
#   unfinished  a run started (checkpoints or config.json) but has no results.json, or one
#               stopped by a signal after saving ("resumable": true: --resume continues it)
#   new         nothing there yet
grid_point_state() {
  local results=$POINT_DIR/results.json
  if [[ -f $results ]]; then
    if grep -Eq '"resumable"[[:space:]]*:[[:space:]]*true' "$results"; then echo unfinished
    elif grep -Eq '"complete"[[:space:]]*:[[:space:]]*false' "$results"; then echo failed
    else echo complete; fi
  elif [[ -e $POINT_DIR/checkpoint.pt || -e $POINT_DIR/task_in_progress.pt || -e $POINT_DIR/config.json ]]; then
    echo unfinished
  else
    echo new
  fi
}

# Whether the selected point, in state $1, is to be run at all.
grid_point_wanted() {
  case $1 in
    complete) return 1 ;;
    failed) ((GRID_RETRY_FAILED)) ;;
    *) return 0 ;;
  esac
}

# The command of the selected point in state $1, into the array POINT_COMMAND: --resume (it
# continues an unfinished run and starts a new one), or --overwrite for a failed run retried.
grid_point_command() {
  local state=$1 restart=--resume
  [[ $state == failed ]] && restart=--overwrite
  POINT_COMMAND=("$GRID_PYTHON" "$GRID_SCRIPT" "${GRID_FLAGS[@]}"
    --density "$POINT_DENSITY" --sparse_init "$POINT_INIT" --growth "$POINT_GROWTH" --seed "$POINT_SEED"
    --output_dir "$POINT_DIR" "$restart")
}

# The arguments as one line a shell reads back as the same words (quoted only where needed).
grid_quote() {
  local word line=""
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=,%+@-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    line+="${line:+ }$word"
  done
  echo "$line"
}

# Append a header for this attempt (time, host, command) to the selected point's log.
grid_start_log() {
  mkdir -p "$(dirname "$POINT_LOG")"
  printf '==== %s on %s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(hostname)" "$(grid_quote "${POINT_COMMAND[@]}")" \
    >>"$POINT_LOG"
}

# Refuse a sweep folder used before with other flags for every run: its complete points would
# be skipped, and the report would mix the two. The flags are recorded in OUT/sweep_flags.txt on
# first use (when called with --record).
grid_check_flags() {
  local record=$GRID_OUT/sweep_flags.txt current
  current=$(grid_quote "$(basename "$GRID_SCRIPT")" "${GRID_FLAGS[@]}")
  if [[ -f $record ]]; then
    [[ $(<"$record") == "$current" ]] || grid_die "$GRID_OUT was swept with other flags ($(<"$record"));" \
      "use another --out (or delete $record if the difference does not change results, e.g. --device)"
  elif [[ ${1-} == --record ]]; then
    mkdir -p "$GRID_OUT"
    echo "$current" >"$record.tmp"
    mv "$record.tmp" "$record"
  fi
}

# The options that rebuild exactly this grid (for the SLURM array tasks).
grid_options() {
  GRID_REBUILD=(--densities "$GRID_DENSITIES" --inits "$GRID_INITS" --growths "$GRID_GROWTHS"
    --seeds "$GRID_SEEDS" --out "$GRID_OUT")
  ((GRID_RETRY_FAILED)) && GRID_REBUILD+=(--retry-failed)
  return 0
}
