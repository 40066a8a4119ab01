// `durable-js`: the example app's `job` orchestrator in JavaScript, a
// wasi:http component built by componentize-js (SpiderMonkey, via
// StarlingMonkey), like guests/hello-js. It shows that the durable protocol
// (docs/durable.md) is language-neutral: below is a whole replay SDK in the
// style of Azure's durable-functions for JavaScript (the orchestrator is a
// generator that yields tasks), then the orchestrator, then the handler.
//
//   Kelvin POSTs {"instance_id", "name", "input", "history"} with the header
//   x-kelvin-trigger: orchestration, and gets back 200 and
//   {"actions": [...], "custom_status": ..., "done"|"failed": ...}.
//   Anything else (someone calling it directly) gets a 400.
//
// Built with (see docs/languages.md):
//   componentize-js guests/durable-js/app.js --wit guests/durable-js/wit \
//       -o target/guests/durable-js.wasm
// Tested without Kelvin (plain node runs the replay on hand-made histories):
//   node --test guests/durable-js/replay.test.mjs

// ===========================================================================
// 1. Tasks: pending results the orchestrator yields
// ===========================================================================
// A task is completed (or failed) once, by a history event or by its
// children (task.all, task.any). `doneAt` records the order tasks completed
// in, so a composite built from tasks that are already done still picks the
// one that completed first in the history: the same winner in every replay.
let completions = 0;

class Task {
  constructor(children = []) {
    this.isCompleted = false;
    this.isFaulted = false;
    this.result = undefined;
    this.error = undefined;
    this.parents = [];
    this.children = children;
    for (const child of children) {
      if (!(child instanceof Task)) throw new TypeError('task.all and task.any take tasks');
      child.parents.push(this);
    }
    const done = children.filter((c) => c.isCompleted).sort((a, b) => a.doneAt - b.doneAt);
    for (const child of done) this.childDone(child);
  }
  complete(result) { this.settle(false, result, undefined); }
  fail(error) { this.settle(true, undefined, error); }
  settle(faulted, result, error) {
    if (this.isCompleted) return; // a late result nobody awaits (the loser of a race)
    Object.assign(this, { isCompleted: true, isFaulted: faulted, result, error, doneAt: ++completions });
    for (const parent of this.parents) parent.childDone(this);
  }
  childDone(child) {}
}

// task.all: the results, in the order given; fails with the first failure.
class AllTask extends Task {
  constructor(children) {
    super(children);
    if (children.length === 0) this.complete([]);
  }
  childDone(child) {
    if (child.isFaulted) this.fail(child.error);
    else if (this.children.every((c) => c.isCompleted)) this.complete(this.children.map((c) => c.result));
  }
}

// task.any: the first task to complete, succeeded or failed (as in Azure:
// compare it with your tasks, read its .result).
class AnyTask extends Task {
  childDone(child) { this.complete(child); }
}

// The request was not the protocol's JSON: the handler answers 400.
class ProtocolError extends Error {}

// Timestamps carry microseconds ("...00.004211Z"); keep milliseconds, which
// every Date parser reads.
function parseTime(text) {
  const ms = Date.parse(String(text).replace(/(\.\d{3})\d+/, '$1'));
  if (Number.isNaN(ms)) throw new ProtocolError(`bad OrchestratorStarted timestamp: ${text}`);
  return ms;
}

// ===========================================================================
// 2. Replay: run the code against the history, answer every decision
// ===========================================================================
// docs/durable.md, "How an SDK replays". The code runs from the start on
// every episode; each decision takes the next task_id (its index in
// `actions`), and results are handed over in history order, the code running
// after each, so it makes the same decisions in the same order every time.
function replay(request, orchestrator) {
  if (!request || typeof request !== 'object' || !Array.isArray(request.history)) {
    throw new ProtocolError('expected {"instance_id", "name", "input", "history": [...]}');
  }
  const history = request.history;
  if (!history.every((e) => e && typeof e === 'object' && typeof e.type === 'string')) {
    throw new ProtocolError('every history event needs a "type"');
  }
  const starts = history.flatMap((e, i) => (e.type === 'OrchestratorStarted' ? [i] : []));
  if (starts.length === 0) throw new ProtocolError('the history has no OrchestratorStarted');
  const lastStart = starts[starts.length - 1];

  const actions = []; // actions[i] is task i's decision
  const tasks = []; // tasks[i] is task i's pending result (null for a signal: no answer comes)
  const waiters = new Map(); // event name -> tasks waiting for it, oldest first
  const buffered = new Map(); // event name -> inputs that arrived before anyone waited
  let now = parseTime(history[starts[0]].timestamp); // never the clock
  let position = starts[0];
  let status; // [value] once set
  let continued; // [input] once continueAsNew was called
  let guids = 0;
  const began = now; // this execution's first OrchestratorStarted, in ms

  const orNull = (v) => (v === undefined ? null : v);
  const decide = (action, task = new Task()) => {
    actions.push(action);
    tasks.push(task);
    return task;
  };
  const ctx = {
    instanceId: request.instance_id,
    input: orNull(request.input),
    get currentUtcDateTime() { return new Date(now); },
    get isReplaying() { return position < lastStart; }, // log only when false
    callActivity: (name, input) => decide({ type: 'CallActivity', name, input: orNull(input) }),
    callActivityWithRetry: (name, retry, input) =>
      decide({ type: 'CallActivity', name, input: orNull(input), retry }),
    callSubOrchestrator: (name, input, instanceId) =>
      decide({ type: 'CallSubOrchestrator', name, input: orNull(input),
               ...(instanceId === undefined ? {} : { instance_id: instanceId }) }),
    createTimer: (date) => decide({ type: 'CreateTimer', fire_at: new Date(date).toISOString() }),
    callEntity: (entity, operation, input) =>
      decide({ type: 'CallEntity', entity, operation, input: orNull(input) }),
    signalEntity: (entity, operation, input) => {
      decide({ type: 'SignalEntity', entity, operation, input: orNull(input) }, null);
    },
    // No decision (no task_id): an event is matched by name, not by id. A
    // waiter stays one after losing a race (as in Azure): it takes the next
    // event of its name, so wait once, outside a loop, and yield it again.
    waitForExternalEvent(name) {
      const task = new Task();
      const early = buffered.get(name);
      if (early && early.length) task.complete(early.shift());
      else waiters.set(name, [...(waiters.get(name) || []), task]);
      return task;
    },
    setCustomStatus: (value) => { status = [orNull(value)]; },
    continueAsNew: (input) => { continued = [orNull(input)]; }, // then return
    // Ids tell executions apart (continue-as-new) by when each began, and
    // never look like a default sub-orchestration id (`{id}:{task_id}`).
    newGuid: () => `${request.instance_id}:${began * 1000}:${guids++}`,
    task: { all: (list) => new AllTask([...list]), any: (list) => {
      if (list.length === 0) throw new TypeError('task.any needs at least one task');
      return new AnyTask([...list]);
    } },
  };

  // Drive the generator: resume it with a result (or throw a failure into
  // it, so try/catch works) until it yields a task still pending, or ends.
  let outcome;
  let waitingOn;
  const resumeWith = (task) => (task.isFaulted ? (g) => g.throw(task.error) : (g) => g.next(task.result));
  const message = (e) => (e instanceof Error ? e.message : String(e));
  let gen;
  try {
    gen = orchestrator(ctx);
  } catch (e) {
    outcome = { failed: { error: message(e) } };
  }
  const advance = (send) => {
    for (;;) {
      let step;
      try {
        step = send(gen);
      } catch (e) {
        outcome = { failed: { error: message(e) } };
        return;
      }
      if (step.done) {
        outcome = continued ? { continue_as_new: { input: continued[0] } } : { done: { output: orNull(step.value) } };
        return;
      }
      waitingOn = step.value;
      if (!(waitingOn instanceof Task)) {
        const e = new TypeError('an orchestrator must yield tasks (ctx.callActivity(...), ctx.task.all(...), ...)');
        send = (g) => g.throw(e);
      } else if (!waitingOn.isCompleted) {
        return;
      } else {
        send = resumeWith(waitingOn);
      }
    }
  };
  if (!outcome && (gen === null || typeof gen !== 'object' || typeof gen.next !== 'function')) {
    outcome = { done: { output: orNull(gen) } }; // a plain function: done at once
  } else if (!outcome) {
    advance((g) => g.next());
  }

  for (let i = 0; i < history.length && !outcome; i++) {
    const e = history[i];
    position = i;
    const task = Number.isInteger(e.task_id) ? tasks[e.task_id] : null;
    switch (e.type) {
      case 'OrchestratorStarted':
        now = parseTime(e.timestamp);
        break;
      case 'TaskCompleted':
      case 'SubOrchestrationCompleted':
      case 'EntityResponded':
        if (task) task.complete(orNull(e.result));
        break;
      case 'TimerFired':
        if (task) task.complete(undefined);
        break;
      case 'TaskFailed':
      case 'SubOrchestrationFailed':
      case 'EntityFailed':
        if (task) task.fail(Object.assign(new Error(String(e.error)), { name: e.type, taskId: e.task_id }));
        break;
      case 'EventRaised': {
        const queue = waiters.get(e.name) || [];
        if (queue.length) queue.shift().complete(orNull(e.input));
        else buffered.set(e.name, [...(buffered.get(e.name) || []), orNull(e.input)]);
        break;
      }
      default: // decisions (TaskScheduled, ...) and ExecutionStarted: Kelvin checks them
    }
    if (waitingOn && waitingOn.isCompleted) advance(resumeWith(waitingOn));
  }

  const answer = { actions };
  if (status) answer.custom_status = status[0];
  return Object.assign(answer, outcome);
}

// ===========================================================================
// 3. The orchestrator: `job`
// ===========================================================================
// Input {"steps": n, "step_ms": ms}: runs activity `job-step` n times, one
// after the other ({"i": i, "step_ms": ms}; it returns i*i), reporting its
// progress as custom status, and outputs the sum (steps=7: 140).
function* job(ctx) {
  const input = ctx.input || {};
  const steps = input.steps;
  if (!Number.isInteger(steps) || steps < 0) throw new Error('job expects {"steps": n, "step_ms": ms}, n >= 0');
  const stepMs = input.step_ms === undefined ? 0 : input.step_ms;
  let sum = 0;
  for (let i = 1; i <= steps; i++) {
    ctx.setCustomStatus({ done: i - 1, of: steps });
    sum += yield ctx.callActivity('job-step', { i, step_ms: stepMs });
  }
  return sum;
}

// ===========================================================================
// 4. The handler
// ===========================================================================
function json(status, value) {
  return new Response(JSON.stringify(value) + '\n', {
    status,
    headers: { 'content-type': 'application/json' },
  });
}

async function handle(request) {
  if (request.headers.get('x-kelvin-trigger') !== 'orchestration') {
    return json(400, {
      error: 'this is a durable orchestrator: Kelvin runs it (POST with x-kelvin-trigger: orchestration). ' +
        'Start an instance with POST /runtime/webhooks/durabletask/orchestrators/{name}.',
    });
  }
  let req;
  try {
    req = JSON.parse(await request.text());
  } catch (e) {
    return json(400, { error: `the body is not JSON: ${e.message}` });
  }
  // One component, one orchestrator: `job`, whatever name it is deployed as.
  let answer;
  try {
    answer = replay(req, job);
  } catch (e) {
    if (e instanceof ProtocolError) return json(400, { error: `not an orchestration request: ${e.message}` });
    throw e;
  }
  const outcome = answer.failed ? `failed: ${answer.failed.error}` : ['done', 'continue_as_new'].find((k) => k in answer) || 'waiting';
  console.error(`${req.instance_id}: ${req.history.length} events, ${answer.actions.length} actions, ${outcome}`);
  return json(200, answer);
}

// Under componentize-js, the Service Worker `fetch` event; under node (the
// tests), no event: the pure parts are handed over on globalThis instead.
if (typeof addEventListener === 'function') {
  addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
}
globalThis.__kelvinDurable = { replay, job, handle, Task, ProtocolError };
