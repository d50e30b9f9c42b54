/**
 * The chat itself: the welcome text, the messages, and the box to write in.
 *
 * Messages are keyed by message_id and placed by sequence, whatever path they came by (the
 * answer to a send, or the live stream, which replays the chat from its start and then follows
 * it): the same message arriving twice updates one entry, so a resubscription or a send racing
 * its own stream event never shows a duplicate. The stream is resubscribed from the last cursor
 * after any end but UNAUTHENTICATED (the visit ended), with a growing pause, so a network drop
 * resumes without a gap.
 *
 * A send carries a fresh request_id and is retried with that same id while the service is
 * UNAVAILABLE: the server answers a repeated id with the first message, never a second one.
 * When nobody can answer (the config says offline, or a send finds no agent), text goes by
 * LeaveMessage instead, which reaches an agent later.
 */

import {
  type Api,
  CALL,
  Code,
  errorText,
  type Failure,
  failure,
  newRequestId,
  retryAfterSeconds,
  retryUnavailable,
  sleep,
} from "./client";
import type { VisitMessage } from "./gen/hafen/webchat/v1/webchat_pb";
import type { Shell } from "./shell";
import { busy, formatTime, h, uid } from "./ui";

export interface ChatOptions {
  shell: Shell;
  api: Api;
  welcome: string;
  offlineMessage: string;
  online: boolean;
  /** The visit is over (its token was refused). */
  onEnded(): void;
  /** A send needs consent granted to the current text. */
  onNeedConsent(): void;
  /** A send needs required pre-chat fields first. */
  onNeedFields(): void;
}

/** The largest body the server takes, in UTF-8 bytes. */
const MAX_BODY = 16 * 1024;
const FIRST_PAUSE_MS = 500;
const MAX_PAUSE_MS = 10_000;

interface Entry {
  message: VisitMessage;
  item: HTMLLIElement;
}

export class Chat {
  readonly element: HTMLElement;
  private readonly list: HTMLOListElement;
  private readonly input: HTMLTextAreaElement;
  private readonly sendButton: HTMLButtonElement;
  private readonly offlineNote: HTMLElement;
  private readonly entries = new Map<string, Entry>();
  private cursor = "";
  private caughtUp = false;
  private offline: boolean;
  private editing: string | null = null;
  private readonly stop$ = new AbortController();

  constructor(private readonly o: ChatOptions) {
    const t = o.shell.t;
    this.offline = !o.online;
    const inputId = uid("message");
    // Busy while the stream replays the chat, so a screen reader announces what arrives after,
    // not the whole history again.
    this.list = h("ol", {
      class: "messages",
      "aria-live": "polite",
      "aria-busy": "true",
      "aria-label": t.panelTitle,
    });
    this.input = h("textarea", {
      id: inputId,
      rows: 2,
      "data-hafen": "message-input",
      "data-autofocus": true,
    });
    this.sendButton = h("button", { type: "submit", class: "primary", "data-hafen": "send" });
    const textLang = o.shell.textLang || null;
    this.offlineNote = o.offlineMessage
      ? h("p", { class: "notice", "data-hafen": "offline", lang: textLang, hidden: true }, o.offlineMessage)
      : h("p", { class: "notice", "data-hafen": "offline", hidden: true }, t.offline);
    const form = h(
      "form",
      { class: "composer" },
      h("label", { for: inputId, class: "sr-only" }, t.messageLabel),
      this.input,
      this.sendButton,
    );
    this.element = h(
      "div",
      { class: "chat" },
      o.welcome && h("p", { class: "welcome", lang: textLang }, o.welcome),
      this.offlineNote,
      this.list,
      form,
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      void busy(this.sendButton, () => this.send());
    });
    this.input.addEventListener("keydown", (event) => {
      // Enter sends, Shift+Enter is a new line; never while an input method composes a word.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        void busy(this.sendButton, () => this.send());
      }
    });
    this.renderOffline();
  }

  /** Starts following the chat (replay from the start, then live). */
  start(): void {
    void this.follow();
  }

  /** Stops the stream for good (the visit ended or was deleted). */
  stop(): void {
    this.stop$.abort();
  }

  private get stopped(): boolean {
    return this.stop$.signal.aborted;
  }

  private async follow(): Promise<void> {
    let pause = FIRST_PAUSE_MS;
    while (!this.stopped) {
      try {
        const stream = this.o.api.client.subscribeVisit(
          { after: this.cursor },
          { signal: this.stop$.signal },
        );
        for await (const item of stream) {
          if (item.cursor) {
            this.cursor = item.cursor;
          }
          pause = FIRST_PAUSE_MS;
          const event = item.event;
          if (event.case === "caughtUp") {
            this.caughtUp = true;
            this.list.setAttribute("aria-busy", "false");
          } else if (event.case !== undefined) {
            this.upsert(event.value, event.case === "messageCreated");
          }
        }
      } catch (err) {
        if (this.stopped) {
          return;
        }
        const f = failure(err);
        if (f.code === Code.Unauthenticated) {
          this.o.onEnded();
          return;
        }
        if (f.code === Code.InvalidArgument) {
          // A cursor the server no longer knows: replay from the start; entries dedupe.
          this.cursor = "";
        }
        pause = Math.max(pause, retryAfterSeconds(f) * 1000);
      }
      await sleep(pause, this.stop$.signal);
      pause = Math.min(pause * 2, MAX_PAUSE_MS);
    }
  }

  /** Adds or updates a message; `live` marks a new one that may deserve the launcher's note. */
  private upsert(message: VisitMessage, live = false): void {
    const entry = this.entries.get(message.messageId);
    if (entry && !newer(message, entry.message)) {
      return;
    }
    const deleted = message.deleteTime !== undefined;
    if (entry && this.editing === message.messageId && !deleted) {
      // Keep the open edit box; the new body shows once editing ends.
      entry.message = message;
      return;
    }
    if (entry && this.editing === message.messageId) {
      this.editing = null;
    }
    const item = this.render(message);
    if (entry) {
      entry.item.replaceWith(item);
    } else {
      this.place(item, message.sequence);
      if (live && this.caughtUp && !message.fromVisitor) {
        this.o.shell.setUnread(true);
      }
      if (item === this.list.lastElementChild) {
        // The list scrolls, not the page: scrollIntoView could move the host page too.
        this.list.scrollTop = this.list.scrollHeight;
      }
    }
    this.entries.set(message.messageId, { message, item });
    this.renderOffline();
  }

  private place(item: HTMLLIElement, sequence: bigint): void {
    for (const child of Array.from(this.list.children)) {
      if (BigInt((child as HTMLElement).dataset["sequence"] ?? "0") > sequence) {
        this.list.insertBefore(item, child);
        return;
      }
    }
    this.list.append(item);
  }

  private render(message: VisitMessage): HTMLLIElement {
    const t = this.o.shell.t;
    const from = message.fromVisitor ? "visitor" : "agent";
    const deleted = message.deleteTime !== undefined;
    const textId = uid("text");
    const meta = [formatTime(message.createTime, this.o.shell.lang)];
    if (message.editTime && !deleted) {
      meta.push(t.edited);
    }
    const item = h(
      "li",
      {
        class: `message ${from}`,
        "data-hafen": "message",
        "data-from": from,
        "data-sequence": message.sequence.toString(),
        "data-message-id": message.messageId,
      },
      h("span", { class: "who" }, message.fromVisitor ? t.you : t.agent),
      h("p", { class: deleted ? "text deleted" : "text", id: textId }, deleted ? t.deletedMessage : message.body),
      h("span", { class: "meta" }, meta.filter(Boolean).join(" · ")),
      message.masked && !deleted && h("span", { class: "meta" }, t.masked),
    );
    if (message.fromVisitor && !deleted) {
      const edit = h("button", { type: "button", class: "small", "data-hafen": "message-edit", "aria-describedby": textId }, t.edit);
      const remove = h("button", { type: "button", class: "small", "data-hafen": "message-delete", "aria-describedby": textId }, t.delete);
      edit.addEventListener("click", () => this.edit(message.messageId));
      remove.addEventListener("click", () => void busy(remove, () => this.remove(message.messageId)));
      item.append(h("div", { class: "tools" }, edit, remove));
    }
    return item;
  }

  private renderOffline(): void {
    const t = this.o.shell.t;
    // Once the chat is open it goes on whatever the hours: only a first message is left.
    const leaving = this.offline && this.entries.size === 0;
    this.offlineNote.hidden = !this.offline;
    this.sendButton.textContent = leaving ? t.leaveMessage : t.send;
  }

  private async send(): Promise<void> {
    const t = this.o.shell.t;
    const body = this.input.value;
    if (body.trim() === "") {
      return;
    }
    if (new TextEncoder().encode(body).length > MAX_BODY) {
      this.o.shell.status(t.errorTooLarge, "error");
      return;
    }
    this.o.shell.status("");
    try {
      const client = this.o.api.client;
      let message: VisitMessage;
      if (this.offline && this.entries.size === 0) {
        const requestId = newRequestId();
        message = await retryUnavailable(() => client.leaveMessage({ requestId, body }, CALL));
      } else {
        const requestId = newRequestId();
        try {
          message = await retryUnavailable(() => client.sendVisitorMessage({ requestId, body }, CALL));
        } catch (err) {
          if (failure(err).reason !== "AGENT_UNAVAILABLE") {
            throw err;
          }
          this.offline = true;
          this.renderOffline();
          const leaveId = newRequestId();
          message = await retryUnavailable(() => client.leaveMessage({ requestId: leaveId, body }, CALL));
        }
      }
      if (this.input.value === body) {
        this.input.value = "";
      }
      this.upsert(message);
    } catch (err) {
      this.failed(failure(err));
    }
  }

  private failed(f: Failure): void {
    const t = this.o.shell.t;
    if (f.code === Code.Unauthenticated) {
      this.o.onEnded();
    } else if (f.reason === "CONSENT_REQUIRED") {
      this.o.onNeedConsent();
    } else if (f.code === Code.FailedPrecondition && f.reason === "INVALID_STATE") {
      this.o.shell.status(t.fieldsMissing, "error");
      this.o.onNeedFields();
    } else if (f.reason === "AGENT_UNAVAILABLE") {
      // LeaveMessage found no agent at all: nobody could ever read it.
      this.o.shell.status(t.noAgents, "error");
    } else if (f.reason === "LEGAL_HOLD_ACTIVE") {
      this.o.shell.status(t.legalHoldEdit, "error");
    } else {
      this.o.shell.status(errorText(f, t), "error");
    }
  }

  private edit(messageId: string): void {
    const entry = this.entries.get(messageId);
    if (!entry || this.editing !== null) {
      return;
    }
    const t = this.o.shell.t;
    this.editing = messageId;
    const boxId = uid("edit");
    const box = h("textarea", { id: boxId, rows: 3, "data-hafen": "message-edit-input" });
    box.value = entry.message.body;
    const save = h("button", { type: "submit", class: "small primary" }, t.save);
    const cancel = h("button", { type: "button", class: "small" }, t.cancel);
    const form = h(
      "form",
      { class: "edit" },
      h("label", { for: boxId, class: "sr-only" }, t.editLabel),
      box,
      h("div", { class: "tools" }, cancel, save),
    );
    const done = () => {
      this.editing = null;
      const current = this.entries.get(messageId);
      if (current) {
        const item = this.render(current.message);
        current.item.replaceWith(item);
        current.item = item;
        item.querySelector<HTMLElement>("button")?.focus();
      }
    };
    cancel.addEventListener("click", done);
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        // Escape leaves the edit box, not the whole panel.
        event.stopPropagation();
        done();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const body = box.value;
      if (body.trim() === "") {
        return;
      }
      void busy(save, async () => {
        try {
          const message = await this.o.api.client.editVisitorMessage({ messageId, body }, CALL);
          const current = this.entries.get(messageId);
          if (current && newer(message, current.message)) {
            current.message = message;
          }
          done();
        } catch (err) {
          this.failed(failure(err));
        }
      });
    });
    entry.item.querySelector(".tools")?.remove();
    entry.item.querySelector(".text")?.replaceWith(form);
    box.focus();
  }

  private async remove(messageId: string): Promise<void> {
    try {
      this.upsert(await this.o.api.client.deleteVisitorMessage({ messageId }, CALL));
      // The message's buttons went with it: the keyboard continues in the message box.
      this.input.focus();
    } catch (err) {
      this.failed(failure(err));
    }
  }
}

/** Whether `incoming` is newer than `current`: a deletion is final, a later edit wins. */
function newer(incoming: VisitMessage, current: VisitMessage): boolean {
  if (current.deleteTime) {
    return false;
  }
  if (incoming.deleteTime) {
    return true;
  }
  return millis(incoming.editTime) > millis(current.editTime);
}

function millis(ts: { seconds: bigint; nanos: number } | undefined): number {
  return ts ? Number(ts.seconds) * 1000 + ts.nanos / 1e6 : 0;
}
