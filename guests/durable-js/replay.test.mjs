// Unit tests of guests/durable-js/app.js's replay, without Kelvin or wasm:
// app.js is evaluated as a script (it adds no fetch listener under node) and
// hands its pure parts over on globalThis.__kelvinDurable.
//
//   node --test guests/durable-js/replay.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import vm from 'node:vm';

const source = readFileSync(new URL('./app.js', import.meta.url), 'utf8');
vm.runInThisContext(source, { filename: 'app.js' });
const { replay, job, handle } = globalThis.__kelvinDurable;

const ID = '9f1c4d7e-0000-4000-8000-000000000001';
// started('02.5'): 10:00:02.5; started('01:00.000001'): 10:01:00.000001.
const started = (s) => ({ type: 'OrchestratorStarted', timestamp: `2026-11-22T10:${s.includes(':') ? s : `00:${s}`}Z` });
const request = (input, history, name = 'job') => ({
  instance_id: ID,
  name,
  input,
  history: [started('00.000000'), { type: 'ExecutionStarted', name, input }, ...history],
});
const scheduled = (id, i, ms = 5) => ({ type: 'TaskScheduled', task_id: id, name: 'job-step', input: { i, step_ms: ms } });
const completed = (id, result) => ({ type: 'TaskCompleted', task_id: id, result });
const step = (i, ms = 5) => ({ type: 'CallActivity', name: 'job-step', input: { i, step_ms: ms } });

// The history Kelvin would build for `job` after `n` steps completed.
function jobHistory(n) {
  const h = [scheduled(0, 1)];
  for (let k = 1; k <= n; k++) {
    h.push(started(`0${k}.004211`), completed(k - 1, k * k));
    h.push(scheduled(k, k + 1));
  }
  return h;
}

test('an empty history after the start: the first activity, no outcome', () => {
  const answer = replay(request({ steps: 3, step_ms: 5 }, []), job);
  assert.deepEqual(answer, { actions: [step(1)], custom_status: { done: 0, of: 3 } });
});

test('a partial history (2 of 3 completed): 3 actions, still waiting', () => {
  const history = jobHistory(2).slice(0, -1); // the 3rd is not scheduled yet
  const answer = replay(request({ steps: 3, step_ms: 5 }, history), job);
  assert.deepEqual(answer, { actions: [step(1), step(2), step(3)], custom_status: { done: 2, of: 3 } });
});

test('a full history: done with the sum 1+4+9', () => {
  const history = [...jobHistory(2), started('03.5'), completed(2, 9)];
  const answer = replay(request({ steps: 3, step_ms: 5 }, history), job);
  assert.deepEqual(answer, {
    actions: [step(1), step(2), step(3)],
    custom_status: { done: 2, of: 3 },
    done: { output: 14 },
  });
});

test('the answer is JSON as the protocol spells it', () => {
  const answer = replay(request({ steps: 1 }, [completed(0, 1)]), job);
  assert.equal(JSON.stringify(answer),
    '{"actions":[{"type":"CallActivity","name":"job-step","input":{"i":1,"step_ms":0}}],' +
    '"custom_status":{"done":0,"of":1},"done":{"output":1}}');
});

test('driven like Kelvin, episode by episode: steps=7 is 140, decisions unchanged', () => {
  const input = { steps: 7, step_ms: 1 };
  const history = [];
  let answer;
  for (let episode = 0; episode < 20; episode++) {
    answer = replay(request(input, history), job);
    // Kelvin's determinism check: the decisions in the history come back.
    const decisions = history.filter((e) => e.type === 'TaskScheduled');
    decisions.forEach((d) => assert.equal(answer.actions[d.task_id].name, d.name));
    if (answer.done || answer.failed) break;
    answer.actions.slice(decisions.length).forEach((a, k) =>
      history.push({ type: 'TaskScheduled', task_id: decisions.length + k, name: a.name, input: a.input }));
    const id = answer.actions.length - 1;
    history.push(started(`${10 + episode}.000001`), completed(id, answer.actions[id].input.i ** 2));
  }
  assert.deepEqual(answer.done, { output: 140 });
  assert.equal(answer.actions.length, 7);
  assert.deepEqual(answer.custom_status, { done: 6, of: 7 });
});

test('a TaskFailed is thrown into the generator: try/catch sees it', () => {
  function* orch(ctx) {
    try {
      yield ctx.callActivity('flaky', 1);
      return 'no error?';
    } catch (e) {
      const fallback = yield ctx.callActivity('fallback', e.message);
      return { caught: e.message, fallback };
    }
  }
  const failed = { type: 'TaskFailed', task_id: 0, error: 'disk full' };
  let answer = replay(request(null, [failed], 'orch'), orch);
  assert.deepEqual(answer.actions, [
    { type: 'CallActivity', name: 'flaky', input: 1 },
    { type: 'CallActivity', name: 'fallback', input: 'disk full' },
  ]);
  assert.equal(answer.done, undefined);
  answer = replay(request(null, [failed, completed(1, 'ok')], 'orch'), orch);
  assert.deepEqual(answer.done, { output: { caught: 'disk full', fallback: 'ok' } });
});

test('an uncaught failure fails the orchestration', () => {
  const history = [scheduled(0, 1), { type: 'TaskFailed', task_id: 0, error: 'step 1 broke' }];
  const answer = replay(request({ steps: 2 }, history), job);
  assert.deepEqual(answer.failed, { error: 'step 1 broke' });
  assert.equal(answer.done, undefined);
  assert.deepEqual(replay(request({ steps: 'x' }, []), job).failed,
    { error: 'job expects {"steps": n, "step_ms": ms}, n >= 0' });
});

// An approval with a deadline: the first of an event and a timer.
function* approval(ctx) {
  const deadline = new Date(ctx.currentUtcDateTime.getTime() + 60_000);
  const timer = ctx.createTimer(deadline);
  const event = ctx.waitForExternalEvent('approve');
  const winner = yield ctx.task.any([event, timer]);
  if (winner === event) return `approved by ${event.result}`;
  return 'timed out';
}

test('task.any: the event comes first, the later timer is ignored', () => {
  const history = [
    { type: 'TimerCreated', task_id: 0, fire_at: '2026-11-22T10:01:00.000Z' },
    started('30.000000'),
    { type: 'EventRaised', name: 'approve', input: 'ada' },
    started('59.000000'),
    { type: 'TimerFired', task_id: 0, fire_at: '2026-11-22T10:01:00.000Z' },
  ];
  // fire_at comes from the first OrchestratorStarted, not the clock.
  const timerAction = { type: 'CreateTimer', fire_at: '2026-11-22T10:01:00.000Z' };
  assert.deepEqual(replay(request(null, history.slice(0, 1), 'approval'), approval), { actions: [timerAction] });
  const answer = replay(request(null, history, 'approval'), approval);
  assert.deepEqual(answer, { actions: [timerAction], done: { output: 'approved by ada' } });
});

test('task.any: the timer comes first, the later event is ignored', () => {
  const history = [
    { type: 'TimerCreated', task_id: 0, fire_at: '2026-11-22T10:01:00.000Z' },
    started('01:00.000001'),
    { type: 'TimerFired', task_id: 0, fire_at: '2026-11-22T10:01:00.000Z' },
    { type: 'EventRaised', name: 'approve', input: 'late' },
  ];
  assert.deepEqual(replay(request(null, history, 'approval'), approval).done, { output: 'timed out' });
});

test('events are buffered until waited for, received in order', () => {
  function* orch(ctx) {
    yield ctx.createTimer(ctx.currentUtcDateTime);
    const a = yield ctx.waitForExternalEvent('x');
    const b = yield ctx.waitForExternalEvent('x');
    return [a, b];
  }
  const history = [
    { type: 'EventRaised', name: 'x', input: 1 },
    { type: 'EventRaised', name: 'x', input: 2 },
    { type: 'TimerFired', task_id: 0 },
  ];
  assert.deepEqual(replay(request(null, history, 'orch'), orch).done, { output: [1, 2] });
});

test('task.all fans out, results in the order given; currentUtcDateTime and isReplaying follow the history', () => {
  const seen = [];
  function* orch(ctx) {
    seen.push([ctx.currentUtcDateTime.toISOString(), ctx.isReplaying]);
    const results = yield ctx.task.all(['a', 'b', 'c'].map((x) => ctx.callActivity('up', x)));
    seen.push([ctx.currentUtcDateTime.toISOString(), ctx.isReplaying]);
    ctx.setCustomStatus('fanned in');
    return results;
  }
  const history = [started('01.000000'), completed(2, 'C'), completed(0, 'A'), started('02.123456'), completed(1, 'B')];
  const answer = replay(request(null, history, 'orch'), orch);
  assert.deepEqual(answer.done, { output: ['A', 'B', 'C'] });
  assert.equal(answer.custom_status, 'fanned in');
  assert.deepEqual(seen, [['2026-11-22T10:00:00.000Z', true], ['2026-11-22T10:00:02.123Z', false]]);
});

test('task.all fails with the first failure', () => {
  function* orch(ctx) {
    yield ctx.task.all([ctx.callActivity('a'), ctx.callActivity('b')]);
  }
  const history = [{ type: 'TaskFailed', task_id: 1, error: 'b broke' }, { type: 'TaskFailed', task_id: 0, error: 'a broke' }];
  assert.deepEqual(replay(request(null, history, 'orch'), orch).failed, { error: 'b broke' });
});

test('the handler: 200 with the answer, 400 without the trigger or with a bad body', async () => {
  const post = (body, headers = { 'x-kelvin-trigger': 'orchestration' }) =>
    handle(new Request('http://kelvin/', { method: 'POST', headers, body }));
  const ok = await post(JSON.stringify(request({ steps: 3, step_ms: 5 }, [])));
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.get('content-type'), 'application/json');
  assert.deepEqual(await ok.json(), { actions: [step(1)], custom_status: { done: 0, of: 3 } });

  const direct = await post('{}', {});
  assert.equal(direct.status, 400);
  assert.match((await direct.json()).error, /durable orchestrator/);
  for (const body of ['not json', '{"instance_id": "x"}', '[]', '{"history": [{"type": "ExecutionStarted"}]}']) {
    const bad = await post(body);
    assert.equal(bad.status, 400, body);
    assert.ok((await bad.json()).error, body);
  }
});
