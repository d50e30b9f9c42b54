/**
 * DOM helpers. Every text reaches the page as a text node (`h` turns strings into text nodes;
 * there is no innerHTML anywhere), because almost every text the widget shows comes from the
 * tenant or an agent. Dialogs keep the keyboard inside them and give focus back when they
 * close, since the widget must work without a mouse.
 */

export type Child = Node | string | null | undefined | false;

type Handler = (event: Event) => void;
type Value = string | number | boolean | null | undefined | Handler;

/**
 * Creates an element. `on<event>` props become listeners; `true` sets an empty attribute,
 * `false`, null and undefined set none; anything else is set as an attribute, as text.
 */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props?: Record<string, Value> | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else if (value !== false && value !== null && value !== undefined) {
      element.setAttribute(name, String(value));
    }
  }
  append(element, ...children);
  return element;
}

export function append(parent: Node, ...children: Child[]): void {
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) {
      parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
}

let counter = 0;

/** An id unique within the widget, for `<label for>` and `aria-labelledby`. */
export function uid(prefix: string): string {
  counter += 1;
  return `hafen-${prefix}-${counter}`;
}

/** A link only for http(s) URLs: a tenant's `javascript:` URL must not become clickable. */
export function safeUrl(url: string): string | null {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}

const FOCUSABLE =
  'a[href], button:not([disabled]), input:not([disabled]), textarea:not([disabled]), select:not([disabled]), [tabindex]:not([tabindex="-1"])';

export function focusables(root: ParentNode): HTMLElement[] {
  return Array.from(root.querySelectorAll<HTMLElement>(FOCUSABLE)).filter(
    (el) => !el.closest("[hidden]"),
  );
}

/** Focuses the first control in `root`, or `root` itself when it has none. */
export function focusFirst(root: HTMLElement): void {
  const first = focusables(root)[0];
  if (first) {
    first.focus();
  } else {
    root.focus();
  }
}

export interface Modal {
  readonly element: HTMLElement;
  close(): void;
}

/**
 * Shows `dialog` as a modal dialog inside `container`: role and aria-modal set, focus moved
 * into it (to the dialog itself when `focusDialog`, so a screen reader starts at its heading
 * and text), Tab cycling inside it, Escape calling `onEscape`. `close` removes it and gives
 * focus back to where it was.
 */
export function openModal(
  container: HTMLElement,
  dialog: HTMLElement,
  options: { labelledBy: string; onEscape: () => void; focusDialog?: boolean },
): Modal {
  const root = container.getRootNode() as Document | ShadowRoot;
  const before = root.activeElement;
  dialog.setAttribute("role", "dialog");
  dialog.setAttribute("aria-modal", "true");
  dialog.setAttribute("aria-labelledby", options.labelledBy);
  dialog.tabIndex = -1;
  dialog.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      options.onEscape();
    } else if (event.key === "Tab") {
      const items = focusables(dialog);
      const first = items[0];
      const last = items[items.length - 1];
      const active = root.activeElement;
      if (!first || !last) {
        event.preventDefault();
      } else if (event.shiftKey && (active === first || active === dialog)) {
        event.preventDefault();
        last.focus();
      } else if (!event.shiftKey && active === last) {
        event.preventDefault();
        first.focus();
      }
    }
  });
  container.appendChild(dialog);
  if (options.focusDialog) {
    dialog.focus();
  } else {
    focusFirst(dialog);
  }
  return {
    element: dialog,
    close() {
      dialog.remove();
      if (before instanceof HTMLElement && before.isConnected) {
        before.focus();
      }
    },
  };
}

/**
 * Runs `work` for a button, one run at a time. The button is marked busy with aria-disabled,
 * not disabled: a disabled button drops the keyboard focus to the page, outside the widget,
 * and with it a dialog's Escape and Tab handling.
 */
export async function busy(button: HTMLButtonElement, work: () => Promise<void>): Promise<void> {
  if (button.getAttribute("aria-disabled") === "true") {
    return;
  }
  button.setAttribute("aria-disabled", "true");
  try {
    await work();
  } finally {
    button.removeAttribute("aria-disabled");
  }
}

/** Formats a protobuf Timestamp for the visitor, or "" when it is missing. */
export function formatTime(
  ts: { seconds: bigint; nanos: number } | undefined,
  lang: string,
  withDate = false,
): string {
  if (!ts) {
    return "";
  }
  const date = new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6));
  return withDate
    ? date.toLocaleString(lang, { dateStyle: "medium", timeStyle: "short" })
    : date.toLocaleTimeString(lang, { hour: "2-digit", minute: "2-digit" });
}
