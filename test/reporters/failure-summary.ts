// A second reporter for `npm test`, beside TAP: after the run it lists every failed test with
// its suites, file and error. A CI log is often kept only as its tail, and TAP prints a
// failure where it happens, hundreds of suites above the summary; this puts the failures
// under it. A run without failures prints nothing, so a passing log is TAP alone.
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestEvent } from 'node:test/reporters';

const STACK_LINES = 16;

interface Failure {
  where: string;
  title: string;
  error: string;
}

export default async function* failureSummary(source: AsyncIterable<TestEvent>): AsyncGenerator<string, void> {
  const suitesByFile = new Map<string, string[]>();
  const failures: Failure[] = [];
  for await (const event of source) {
    if (event.type === 'test:start') {
      const path = suitesByFile.get(event.data.file ?? '') ?? [];
      path.length = event.data.nesting;
      path.push(event.data.name);
      suitesByFile.set(event.data.file ?? '', path);
    } else if (event.type === 'test:fail' && !onlyItsSubtestsFailed(event.data.details.error)) {
      const path = suitesByFile.get(event.data.file ?? '') ?? [];
      failures.push({
        where: location(event.data.file, event.data.line, event.data.column),
        title: [...path.slice(0, event.data.nesting), event.data.name].join(' > '),
        error: describe(event.data.details.error),
      });
    }
  }
  if (failures.length === 0) return;
  yield `\nFAILED (${failures.length}), each with its suites, file and error:\n`;
  for (const failure of failures) {
    yield `\n- ${failure.title}\n  at ${failure.where}\n${indent(failure.error)}\n`;
  }
}

// A suite fails when one of its tests does; that test is listed already.
function onlyItsSubtestsFailed(error: unknown): boolean {
  return (error as { failureType?: unknown }).failureType === 'subtestsFailed';
}

function location(file: string | undefined, line: number | undefined, column: number | undefined): string {
  if (file === undefined) return '(no file)';
  const path = file.startsWith('file:') ? fileURLToPath(file) : file;
  return `${relative(process.cwd(), path)}:${line ?? '?'}:${column ?? '?'}`;
}

// The runner wraps what a test threw in an ERR_TEST_FAILURE whose cause is the thrown value.
function describe(error: unknown): string {
  const wrapper = error as { failureType?: string; cause?: unknown; message?: string };
  const cause = wrapper.cause ?? error;
  const kind = wrapper.failureType === undefined ? '' : `[${wrapper.failureType}] `;
  const text = cause instanceof Error || (typeof cause === 'object' && cause !== null && 'stack' in cause)
    ? String((cause as { stack?: unknown }).stack ?? (cause as { message?: unknown }).message)
    : String(cause ?? wrapper.message);
  return kind + text.split('\n').slice(0, STACK_LINES).join('\n');
}

function indent(text: string): string {
  return text.split('\n').map((line) => `    ${line}`).join('\n');
}
