# Knowledge distillation (Q1) and continual learning (Q2), end to end.
#   make all       everything the assignment asks for, into out/ (a GPU box; downloads CIFAR-10,
#                  ImageNet weights and 100 DigiFace-1M identities on first use)
#   make demo      the same pipeline offline on synthetic data, CPU, 2-3 min on 2 cores, into out/demo/
#   make test      the test suite (CPU, no network), 5-6 min on 2 cores (+1-2 min to make .venv)
#   make mutants   mutation testing of common.py's training path (dev only: installs mutmut), MUTANTS= to choose
#   make report    the hand-in: out/report.pdf (and .typ, .json) from whatever has run; AUTHOR= STUDENT_ID=
#   make plan      what make all will run on this card: precision, lock-step groups, memory, disk, time
#   make bench     throughput of each kind of step; make lr-range / make compare: the students' lr range
#                  test and recipe comparison on the CIFAR-10 in DATA
# Steps: teacher -> kd / kd-table / kd-sweep, teacher -> fe / ft / lwf / joint / ft-all (continual), lwf-sweep -> report.
# Each step resumes an interrupted run and skips a finished one (the scripts check out/<run>/).
#
# Variables left empty use the script's own default (python q1a_teacher.py --help, ...), and a set
# variable applies to every step this make command runs: `make kd EPOCHS=5` with no teacher yet
# trains the teacher with 5 epochs too.
PYTHON ?=#                an interpreter that has (or may pip-install) requirements.txt; empty: a project .venv
DATA   ?= data#           CIFAR-10 (downloaded here) and DigiFace-1M's cache
OUT    ?= out#            results
DEMO   ?= out/demo#       make demo's OUT
DEVICE ?=#                cpu, cuda, cuda:N (default: cuda if present)
EPOCHS ?=#                teacher 30, students 30, continual 20
LR     ?=#                teacher 0.1, students 0.02; Q2's "original learning rate" (default: the teacher's)
BATCH  ?=#                teacher 512, students 512, faces 128
WARMUP ?=#                teacher 2, students 1 (epochs of linear lr warm-up)
SEED   ?=#                0 (the first seed; seed i of a student or Q2 method is SEED + i)
SEEDS  ?=#                seeds per student of the KD table and per Q2 method: 3 on CUDA, 1 on the CPU
PRETRAINED ?=#            teacher: 1 = ImageNet weights, 0 = random
T      ?= 20#             make kd: temperature
LAMBDA ?= 0.1#            make kd: weight of the soft targets
BN     ?=#                student BatchNorm: 1 (default) or 0
DROPOUT ?=#               student dropout before the last FC: 0
AUGMENT ?=#               student crop + flip: 1
SWEEP_T ?=#               kd-sweep temperatures: 1 2 4 8 16 32
SWEEP_LAM ?=#             kd-sweep lambdas: 0.1 0.3 0.5 0.7 0.9
SWEEP_SEEDS ?=#           seeds per student of the sweep: 1
GROUP  ?=#                students per lock-step group (KD table and sweep): as many as fit the GPU, 10 on the CPU
FC1_LR ?=#                students: lr of the first FC (93,312 inputs), % of LR: 10
CLIP   ?=#                students: clip each one's gradient norm to this: 5 (0: off)
CKPT_EVERY ?=#            lock-step groups: checkpoint every k epochs (0, the default: writes under 5% of the time)
PRECISION ?=#             auto (bf16 on GPUs of compute capability >= 8.0, fp16 below, fp32 on the CPU), bf16, fp16, fp32
COMPILE ?=#               1: torch.compile the models (off until a GPU run shows it is faster)
FACES  ?=#                face folder <subject>/<image> or train/ + test/ (default: DigiFace-1M)
FACES_URL ?=#             DigiFace-1M zip URL
SUBJECTS ?=#              100
PER_SUBJECT ?=#           50
TRAIN_PER_SUBJECT ?=#     40
FACE_SIZE ?=#             64
FT_LAYERS ?=#             "conv5_x:10" = layer4 at 10% of the original lr
FT_ALL_LR ?=#             ft-all: % of the original lr for every layer (default: FT_LAYERS' first rate)
LWF_LR ?=#                10 (% of the original lr, backbone + old head; joint training too)
LWF_WARMUP ?=#            5 epochs of new head alone
LWF_T  ?=#                2
LWF_LAMBDA ?=#            1
LWF_LAMBDAS ?= 0.1 0.3 1 3#  make lwf-sweep: LwF at these λo, and at 0 (fine-tuning at LwF's rates)
LWF_ZERO ?=#              1 (default): make lwf (and continual, all) trains LwF at λo = 0 beside it; 0: not
RECIPES ?=#               make compare: student recipes of bench.py (default: all)
ADAPT_BN ?=#              0: BatchNorm statistics frozen in fine-tuning and LwF
MUTANTS ?= common.x_kd_loss* common.x_soft_* common.x_lwf_loss* common.x_joint_loss* common.x_old_task* \
           common.x_new_task* common.x_fidelity* common.x_warmup_cosine* common.x_sgd* common.x_student_groups*#  make mutants
AUTHOR ?=#                make report: the student's name on the title page (empty: a line to fill in)
STUDENT_ID ?=#            make report: the student's ID

opt  = $(if $(strip $($(1))),--$(2) $(strip $($(1))))
qopt = $(if $(strip $($(1))),--$(2) "$(strip $($(1)))")
RUN_ARGS = --data $(strip $(DATA)) --out $(strip $(OUT)) $(call opt,DEVICE,device) $(call opt,EPOCHS,epochs) \
           $(call opt,LR,lr) $(call opt,BATCH,batch) $(call opt,SEED,seed) $(call opt,PRECISION,precision) \
           $(call opt,COMPILE,compile)
TEACHER_ARGS = $(RUN_ARGS) $(call opt,WARMUP,warmup) $(call opt,PRETRAINED,pretrained)
KD_ARGS = $(RUN_ARGS) $(call opt,WARMUP,warmup) $(call opt,BN,bn) $(call opt,DROPOUT,dropout) $(call opt,AUGMENT,augment) \
          $(call opt,SEEDS,seeds) $(call opt,FC1_LR,fc1-lr) $(call opt,CLIP,clip) $(call opt,CKPT_EVERY,ckpt-every)
CL_ARGS = $(RUN_ARGS) $(call qopt,FACES,faces) $(call opt,FACES_URL,faces-url) $(call opt,SUBJECTS,subjects) \
          $(call opt,PER_SUBJECT,per-subject) $(call opt,TRAIN_PER_SUBJECT,train-per-subject) \
          $(call opt,FACE_SIZE,face-size) $(call qopt,FT_LAYERS,ft-layers) $(call opt,LWF_LR,lwf-lr) \
          $(call opt,LWF_WARMUP,lwf-warmup) $(call opt,LWF_T,lwf-T) $(call opt,LWF_LAMBDA,lwf-lambda) \
          $(call opt,FT_ALL_LR,ft-all-lr) $(call opt,LWF_ZERO,lwf-zero) \
          $(call opt,ADAPT_BN,adapt-bn) $(call opt,SEEDS,seeds)
TEACHER_DONE = $(strip $(OUT))/teacher/result.json

.PHONY: all teacher kd kd-table kd-sweep continual fe ft lwf joint ft-all lwf-sweep report demo bench lr-range compare plan test deps \
        mutants clean help
.NOTPARALLEL:  # one GPU, and steps that share run folders: `make -j` runs them one at a time

help:
	@sed -n '1,/^PYTHON/p' Makefile | grep '^#' | sed 's/^# \{0,1\}//'
	@echo; echo "Variables (empty: the script's own default):"; sed -n '/^PYTHON ?=/,/^STUDENT_ID/p' Makefile

# Install. A fresh Ubuntu 24.04 / Debian 12 Python refuses `pip install` (PEP 668), so requirements.txt
# goes into a project .venv made with --system-site-packages: a box's preinstalled CUDA torch is reused,
# not downloaded again, if torch and torchvision import together; if they do not (a torchvision built
# for another torch: "operator torchvision::nms does not exist"), a matching pair goes into .venv.
# PYTHON=/path/to/python skips the venv and installs into that interpreter.
IMPORTS = e=$$($(PYTHON) -c 'import torch, torchvision' 2>&1) || { e=$$(printf '%s\n' "$$e" | tail -n 1); false; }
ifeq ($(strip $(PYTHON)),)
PYTHON := .venv/bin/python
STAMP  := .venv/.installed
$(STAMP): requirements.txt
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { echo "error: python3 cannot make a virtual environment (no venv/ensurepip module); install it with 'sudo apt install python3-venv', or give PYTHON=" >&2; exit 1; }
	python3 -m venv --system-site-packages .venv
	$(PYTHON) -m pip install -q -r requirements.txt
	@$(IMPORTS) || { echo "the preinstalled torch and torchvision do not import together ($$e): installing a matching pair into .venv"; \
	  grep -E '^torch' requirements.txt > .venv/torch.txt && $(PYTHON) -m pip install -q --ignore-installed -r .venv/torch.txt; }
	@$(IMPORTS) || { echo "error: torch and torchvision in .venv do not import together: $$e" >&2; exit 1; }
	@touch $@
else
STAMP  := .deps-installed
$(STAMP): requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	@$(IMPORTS) || { echo "error: torch and torchvision in $(PYTHON) do not import together ($$e); install a matching pair there, or leave PYTHON empty for a project .venv" >&2; exit 1; }
	@touch $@
endif
deps: $(STAMP)

# The required parts first (teacher, kd-table, continual, report; -k: a failed part does not stop the
# others), then the bonus sweep, then the report again: a bonus failure never costs the required parts.
# The exit status is non-zero if any part failed.
all: $(STAMP)
	@s=0; $(MAKE) --no-print-directory -k kd-table continual report || s=1; \
	$(MAKE) --no-print-directory kd-sweep || s=1; \
	$(MAKE) --no-print-directory report || s=1; exit $$s

teacher: $(STAMP)
	$(PYTHON) q1a_teacher.py $(TEACHER_ARGS)
$(TEACHER_DONE): | $(STAMP)
	$(PYTHON) q1a_teacher.py $(TEACHER_ARGS)

kd: $(TEACHER_DONE)
	$(PYTHON) q1b_kd.py $(KD_ARGS) --T $(T) --lam $(LAMBDA)
kd-table: $(TEACHER_DONE)
	$(PYTHON) q1b_kd.py $(KD_ARGS) --table $(call opt,GROUP,group)
kd-sweep: $(TEACHER_DONE)
	$(PYTHON) q1b_kd.py $(KD_ARGS) --sweep $(call opt,SWEEP_T,sweep-T) $(call opt,SWEEP_LAM,sweep-lam) $(call opt,GROUP,group) \
	  $(call opt,SWEEP_SEEDS,sweep-seeds)

continual: $(TEACHER_DONE)
	$(PYTHON) q2_continual.py $(CL_ARGS)
fe ft lwf joint ft-all: $(TEACHER_DONE)
	$(PYTHON) q2_continual.py $(CL_ARGS) --methods $@
lwf-sweep: $(TEACHER_DONE)
	$(PYTHON) q2_continual.py $(CL_ARGS) --methods --lwf-sweep $(LWF_LAMBDAS)

report: $(STAMP)
	$(PYTHON) report.py --out $(strip $(OUT)) --author "$(AUTHOR)" --student-id "$(STUDENT_ID)"

# The whole pipeline offline: synthetic CIFAR-10 (in the real cifar-10-batches-py format) and a
# synthetic face folder, a teacher from random weights, small sizes, CPU. The sizes and rates are
# chosen so that each method shows its known character (see README, "make demo"). The steps are the
# targets' own commands (make -n prints them), run in one Python process: torch and torchvision are
# imported once, not six times (3.5 s each on 2 cores). The 3-epoch lock-step groups write no checkpoint.
DEMO_VARS = OUT=$(strip $(DEMO)) DATA=$(strip $(DEMO))/data DEVICE=cpu PRETRAINED=0 WARMUP=0
DEMO_STEP = $(MAKE) -s -n --no-print-directory -o $(strip $(DEMO))/teacher/result.json
demo: $(STAMP)
	@mkdir -p $(strip $(DEMO)) && { $(DEMO_STEP) teacher $(DEMO_VARS) EPOCHS=3 BATCH=8 LR=0.01; \
	  $(DEMO_STEP) kd-table $(DEMO_VARS) EPOCHS=3 BATCH=24 LR=0.004 CKPT_EVERY=3; \
	  $(DEMO_STEP) continual $(DEMO_VARS) EPOCHS=3 BATCH=10 LR=0.01 FACES=$(strip $(DEMO))/data/faces \
	    SUBJECTS=10 PER_SUBJECT=10 TRAIN_PER_SUBJECT=8 FACE_SIZE=16 LWF_WARMUP=1 \
	    FT_LAYERS="conv4_x:100 conv5_x:100" LWF_LR=30 FT_ALL_LR=30; \
	  $(DEMO_STEP) kd-sweep $(DEMO_VARS) EPOCHS=1 BATCH=24 LR=0.004 SWEEP_T="2 8" SWEEP_LAM="0.5 0.9"; \
	  $(DEMO_STEP) report $(DEMO_VARS); } > $(strip $(DEMO))/commands.txt
	$(PYTHON) -c 'import machinery; machinery.write_demo_data("$(strip $(DEMO))/data"); \
	  machinery.run_commands(open("$(strip $(DEMO))/commands.txt").read())'

bench: $(STAMP)
	$(PYTHON) bench.py --out $(strip $(OUT)) $(call opt,DEVICE,device)
# what make all will run with these variables, its disk and downloads, and an estimated time here (trains nothing)
plan: $(STAMP)
	$(PYTHON) bench.py --plan --out $(strip $(OUT)) $(call opt,DEVICE,device) --teacher-args "$(TEACHER_ARGS)" \
	  --kd-args "$(KD_ARGS) $(call opt,SWEEP_T,sweep-T) $(call opt,SWEEP_LAM,sweep-lam) $(call opt,GROUP,group) \
	  $(call opt,SWEEP_SEEDS,sweep-seeds)" --cl-args '$(CL_ARGS)'
# the students' lr range test on the CIFAR-10 in DATA (synthetic images if none; uses OUT/teacher if there):
# OUT/lr_range.png and .md; make compare: the student recipes of bench.py's RECIPES, EPOCHS each: OUT/compare.md
lr-range: $(STAMP)
	$(PYTHON) bench.py --lr-range --data $(strip $(DATA)) --out $(strip $(OUT)) $(call opt,DEVICE,device) \
	  $(call opt,BATCH,batch)
compare: $(STAMP)
	$(PYTHON) bench.py --compare $(RECIPES) --data $(strip $(DATA)) --out $(strip $(OUT)) $(call opt,DEVICE,device) \
	  $(call opt,BATCH,batch) $(call opt,EPOCHS,epochs)

test: $(STAMP)
	$(PYTHON) -m pytest -q -rs -o tmp_path_retention_policy=failed tests

# Mutation testing (dev only: installs mutmut 3.8.1 here): the functions of common.py named in MUTANTS, each mutant
# run against the training path's tests (setup.cfg). One thread each: forked workers of a threaded torch hang.
mutants: $(STAMP)
	$(PYTHON) -m pip install -q "mutmut==3.8.1"
	OMP_NUM_THREADS=1 $(PYTHON) -m mutmut run $(foreach m,$(MUTANTS),"$(m)")
	$(PYTHON) -m mutmut results

clean:
	rm -rf $(strip $(OUT))
