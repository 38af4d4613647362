// The reconnect and heartbeat policies, with no I/O and no clock: a port of
// src/sdk.rs (Rng, Backoff, Endpoints, SmartHeartbeat) so the TypeScript
// client behaves like the Rust SDK.

const MASK64 = (1n << 64n) - 1n;

/** A small seeded PRNG (xorshift64*), so jitter can be fixed in tests. */
export class Rng {
  private s: bigint;

  constructor(seed: bigint | number) {
    this.s = (BigInt(seed) & MASK64) | 1n;
  }

  static fromEntropy(): Rng {
    const hi = BigInt(Math.floor(Math.random() * 2 ** 32));
    const lo = BigInt(Math.floor(Math.random() * 2 ** 32));
    return new Rng((hi << 32n) | lo | BigInt(Date.now()));
  }

  nextU64(): bigint {
    let x = this.s;
    x ^= x >> 12n;
    x = (x ^ (x << 25n)) & MASK64;
    x ^= x >> 27n;
    this.s = x;
    return (x * 0x2545f4914f6cdd1dn) & MASK64;
  }

  /** Uniform in 0..=max (max a safe integer). */
  belowOrEq(max: number): number {
    return Number(this.nextU64() % (BigInt(Math.max(0, Math.floor(max))) + 1n));
  }
}

/**
 * Exponential backoff with full jitter: attempt k waits a uniform random
 * time in [min, min(max, base * 2^k)]. Never a tight loop (min >= 1 ms).
 */
export class Backoff {
  private minMs: number;
  private baseMs: number;
  private maxMs: number;
  private attemptNo = 0;

  constructor(minMs: number, baseMs: number, maxMs: number) {
    this.minMs = Math.max(1, minMs);
    this.maxMs = Math.max(maxMs, this.minMs);
    this.baseMs = Math.min(Math.max(baseMs, this.minMs), this.maxMs);
  }

  /** Adopts new bounds (the dispatcher's) keeping the attempt count. */
  setBounds(minMs: number, maxMs: number): void {
    const attempt = this.attemptNo;
    const base = this.baseMs;
    this.minMs = Math.max(1, minMs);
    this.maxMs = Math.max(maxMs, this.minMs);
    this.baseMs = Math.min(Math.max(base, this.minMs), this.maxMs);
    this.attemptNo = attempt;
  }

  nextDelayMs(rng: Rng): number {
    const ceiling = Math.min(this.baseMs * 2 ** Math.min(this.attemptNo, 30), this.maxMs);
    this.attemptNo += 1;
    return this.minMs + rng.belowOrEq(Math.max(0, ceiling - this.minMs));
  }

  /** A connection carried a round trip: the next failure starts over. */
  reset(): void {
    this.attemptNo = 0;
  }

  get attempt(): number {
    return this.attemptNo;
  }

  get bounds(): [number, number] {
    return [this.minMs, this.maxMs];
  }
}

/** An ordered endpoint list; a failed endpoint drifts to the next, GoAway jumps. */
export class Endpoints {
  private list: string[];
  private cur = 0;

  constructor(list: string[]) {
    this.list = [...list];
  }

  /** A fresh list (from the dispatcher): start from its first entry. */
  replace(list: string[]): void {
    if (list.length > 0) {
      this.list = [...list];
      this.cur = 0;
    }
  }

  current(): string | undefined {
    return this.list[this.cur];
  }

  /** The current endpoint failed: next one (wrapping). True when the whole list was tried. */
  fail(): boolean {
    if (this.list.length === 0) return true;
    this.cur = (this.cur + 1) % this.list.length;
    return this.cur === 0;
  }

  /** GoAway named `endpoint`: go there next, the rest stays behind it. */
  goAway(endpoint: string): void {
    if (endpoint === "") {
      this.fail();
      return;
    }
    this.list = [endpoint, ...this.list.filter((e) => e !== endpoint)];
    this.cur = 0;
  }

  get length(): number {
    return this.list.length;
  }

  all(): readonly string[] {
    return this.list;
  }
}

/** Pongs in a row that prove an interval. */
const PROOF = 3;

/**
 * Adaptive heartbeat inside the server's bounds: short while the link is
 * unproven, longer after 3 pongs in a row, back to the proven interval and
 * a probe after a missed pong; background uses the proven interval only.
 */
export class SmartHeartbeat {
  readonly minMs: number;
  readonly maxMs: number;
  private stepMs: number;
  private currentMs: number;
  private provenMs_: number;
  private ceilingMs: number;
  private streak = 0;
  private foreground_ = true;
  private probing = false;

  constructor(minMs: number, maxMs: number) {
    this.minMs = Math.max(1, minMs);
    this.maxMs = Math.max(maxMs, this.minMs);
    this.stepMs = Math.max(1, Math.floor((this.maxMs - this.minMs) / 8));
    this.currentMs = this.minMs;
    this.provenMs_ = this.minMs;
    this.ceilingMs = this.maxMs + 1;
  }

  /** Wait before the next ping (0: a probe is due now). */
  intervalMs(): number {
    if (this.probing) return 0;
    if (this.foreground_) return this.currentMs;
    return Math.max(this.provenMs_, Math.min(this.currentMs, this.provenMs_));
  }

  get provenMs(): number {
    return this.provenMs_;
  }

  get foreground(): boolean {
    return this.foreground_;
  }

  onPong(): void {
    if (this.probing) {
      this.probing = false;
      return;
    }
    if (!this.foreground_) return;
    this.streak += 1;
    if (this.streak >= PROOF) {
      this.provenMs_ = Math.max(this.provenMs_, this.currentMs);
      const next = Math.min(this.currentMs + this.stepMs, this.maxMs);
      if (next < this.ceilingMs) this.currentMs = next;
      this.streak = 0;
    }
  }

  /** A ping went unanswered. True when the link is dead (the probe failed too). */
  onMissed(): boolean {
    if (this.probing) {
      this.probing = false;
      return true;
    }
    if (this.currentMs > this.provenMs_) this.ceilingMs = Math.min(this.ceilingMs, this.currentMs);
    if (this.provenMs_ >= this.ceilingMs) this.provenMs_ = this.minMs;
    this.currentMs = this.provenMs_;
    this.streak = 0;
    this.probing = true;
    return false;
  }

  /** True when a heartbeat should go out now (returning to the foreground). */
  setForeground(foreground: boolean): boolean {
    const returning = foreground && !this.foreground_;
    this.foreground_ = foreground;
    this.streak = 0;
    return returning;
  }

  resetForNewLink(): void {
    this.currentMs = Math.min(this.provenMs_, this.currentMs);
    this.streak = 0;
    this.probing = false;
  }

  resetNetwork(): void {
    const fg = this.foreground_;
    const fresh = new SmartHeartbeat(this.minMs, this.maxMs);
    Object.assign(this, fresh);
    this.foreground_ = fg;
  }
}
