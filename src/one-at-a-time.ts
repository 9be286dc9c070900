/**
 * `run` once at a time: callers that come while it runs share its answer. For work an admin
 * request starts that costs something elsewhere (connections to the model server, every
 * worker's metrics): a burst of admin requests then costs what one does.
 */
export function oneAtATime<T>(run: () => Promise<T>): () => Promise<T> {
  let running: Promise<T> | undefined;
  return () => {
    running ??= run().finally(() => (running = undefined));
    return running;
  };
}
